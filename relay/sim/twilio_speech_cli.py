"""``relay simulate --mode conversation-relay|gather``: scripted callers for Twilio-native
speech agents; prints the dialogue with timings (relay/sim/conversation_relay.py,
relay/sim/gather.py)."""

from __future__ import annotations

import argparse
from functools import partial

from .. import interrupt
from . import conversation_relay, gather

DEFAULT_SCRIPT = ["Hello, what time do you open tomorrow?", "Thank you, goodbye."]


def run(args: argparse.Namespace, token: str) -> int:
    url = args.url.rstrip("/")
    lines = list(args.say) or DEFAULT_SCRIPT
    failed = 0
    for n in range(max(1, args.calls)):
        if args.mode == "conversation-relay":
            script = [conversation_relay.Turn(text) for text in lines]
            cr = interrupt.run(
                partial(conversation_relay.place_call, url, token, script, linger_s=3.0)
            )
            print(f"call {n + 1} ({cr.call_sid}):")
            print(conversation_relay.format_dialogue(cr.dialogue))
            if cr.first_token_s:
                ms = ", ".join(f"{s * 1000:.0f}" for s in cr.first_token_s)
                print(f"prompt -> first text token: {ms} ms")
            problem = cr.rejected or cr.refused or cr.error
            end = f"agent ended {cr.handoff}" if cr.ended else problem or "caller hung up"
            print(f"end: {end}")
            failed += bool(problem)
        else:
            utterances = [gather.Utterance(text) for text in lines]
            g = interrupt.run(gather.place_call, url, token, utterances)
            print(f"call {n + 1} ({g.call_sid}):")
            print(gather.format_dialogue(g))
            failed += bool(g.error or g.http_errors)
    return 1 if failed else 0
