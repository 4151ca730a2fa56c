"""Graceful drain (relay/http/drain.py): on SIGTERM relay takes no new calls, lets the active
ones finish up to ``server.drain_timeout_s``, ends the rest with the fallback message, and
exits 0. In process (``drain()`` directly) and through a real ``relay serve`` process."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from conftest import ACCOUNT_SID, AUTH_TOKEN, api_request
from relay_process import read_to_end, relay_process

from relay.control.store import DEFAULT_TENANT
from relay.http.drain import drain
from relay.sim import simulator

GOODBYE = "We are restarting, please call back in a minute. Goodbye."


async def test_draining_refuses_new_calls_and_lets_active_ones_finish(
    start_relay, make_config, e2e
):
    relay_ = await start_relay(make_config())
    _key, key = relay_.state.control.store.create_key(DEFAULT_TENANT, "t")
    with trio.fail_after(15):
        active = await relay_.dial()
        await relay_.wait_record(active.call_sid, "active")
        counts: dict[str, int] = {}

        async def run_drain() -> None:
            counts.update(await drain(relay_.server, timeout_s=10.0))

        relay_.nursery.start_soon(run_drain)
        await relay_.wait_until(lambda: relay_.state.draining)
        # a new call: rejected before any agent, recorded with the reason
        call_sid = e2e.sid("CA")
        _response, twiml = await relay_.voice(call_sid)
        assert twiml is not None and twiml.verbs == ["Reject"]
        assert twiml.root[0].get("reason") == "busy"
        rejected = relay_.records(call_sid)
        assert (rejected.status, rejected.reject_reason) == ("rejected", "draining")
        assert relay_.metrics.calls_rejected["draining"] == 1
        health = await relay_.get("/healthz")
        assert health.status == 503 and orjson.loads(health.body)["status"] == "draining"
        status, body = await api_request(
            relay_, "POST", "/api/v1/calls", key, {"to": "+14155550123", "from": "+1", "agent": "x"}
        )
        assert status == 503 and body["error"]["code"] == "draining"
        # the active call goes on and ends on its own
        await active.send_media(b"\xff" * 1600)
        await active.hang_up()
        await relay_.wait_until(lambda: bool(counts))
    assert counts == {"finished": 1, "ended": 0}
    assert relay_.records(active.call_sid).end_reason == "caller hung up"


async def test_calls_still_active_at_the_bound_hear_the_fallback_message(start_relay, make_config):
    cfg = make_config(
        agents={"desk": {"type": "parrot", "greeting": True, "fallback_message": GOODBYE}},
        default_agent="desk",
    )
    relay_ = await start_relay(cfg)
    results: list[Any] = []

    async def caller() -> None:
        results.append(
            await simulator.place_call(
                relay_.base_url, AUTH_TOKEN, account_sid=ACCOUNT_SID, duration_s=30.0
            )
        )

    with trio.fail_after(20):
        relay_.nursery.start_soon(caller)
        await relay_.wait_until(lambda: relay_.metrics.active_calls == 1)
        counts = await drain(relay_.server, timeout_s=0.5)
        await relay_.wait_until(lambda: bool(results))
    assert counts == {"finished": 0, "ended": 1}
    [result] = results
    assert result.hung_up_by == "relay", result.outcome
    assert result.said == [GOODBYE]  # Twilio said it through <Connect action>
    record = relay_.records(result.call_sid)
    assert (record.status, record.end_reason) == ("completed", "drained")
    assert record.fallback_message_played


async def test_relay_serve_drains_on_sigterm_and_exits_0(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[twilio]\nauth_token = "{AUTH_TOKEN}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/relay.db"\n'
        "[server]\ndrain_timeout_s = 20\nadmission_max_lag_ms = 10000\n"
        '[agents.parrot]\ntype = "parrot"\ngreeting = true\n'
    )
    with trio.fail_after(60):
        async with relay_process(serve(config), tmp_path, b"public URL") as (process, log):
            match = re.search(rb"public URL (http://\S+)\)", log)
            assert match, log.decode()
            base = match.group(1).decode()

            async def drain_output() -> None:
                await read_to_end(process, log)

            results: list[Any] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain_output)

                async def caller() -> None:
                    results.append(await simulator.place_call(base, AUTH_TOKEN, duration_s=3.0))

                nursery.start_soon(caller)
                while b"-> agent parrot" not in log:  # the call was answered
                    await trio.sleep(0.05)
                await trio.sleep(0.5)  # its stream is up
                process.send_signal(signal.SIGTERM)
                while b"draining" not in log:
                    await trio.sleep(0.02)
                refused = await simulator.place_call(base, AUTH_TOKEN, duration_s=1.0)
                assert refused.rejected and "reject" in refused.rejected, refused.outcome
                code = await process.wait()
                nursery.cancel_scope.cancel()
    text = log.decode("utf-8", "replace")
    assert code == 0, text
    [result] = results
    assert result.ok and result.hung_up_by == "caller", result.outcome  # it finished
    assert "drained: 1 call(s) finished, 0 ended" in text


@pytest.mark.parametrize("when", [b"public URL", b"workers on port"])
async def test_relay_serve_stops_on_ctrl_c_without_a_traceback(tmp_path: Path, when: bytes) -> None:
    """Ctrl-C (SIGINT) stops at once: one "stopped" line and exit status 0, not the
    KeyboardInterrupt traceback Trio's task groups wrap it in. Also when it arrives while
    the workers are still starting (``workers on port``: before any of them serves)."""
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[twilio]\nauth_token = "{AUTH_TOKEN}"\n[store]\nurl = "sqlite:///{tmp_path}/relay.db"\n'
    )
    with trio.fail_after(60):
        async with relay_process(serve(config), tmp_path, when) as (process, log):
            process.send_signal(signal.SIGINT)
            text = await read_to_end(process, log)
    assert process.returncode == 0, text
    assert "stopped" in text and "Traceback" not in text, text


def serve(config: Path) -> list[str]:
    """``relay serve`` on a free port (workers as on this machine)."""
    return ["serve", "--config", str(config), "--port", "0"]


async def test_ctrl_c_in_another_command_exits_130_without_a_traceback(tmp_path: Path) -> None:
    """Any other command cut short by Ctrl-C (here the demo's calls in progress) says so
    in one line and exits 130, the shell's status for an interrupted command."""
    demo = ["demo", "--agent", "parrot", "--calls", "20", "--out", str(tmp_path / "out")]
    with trio.fail_after(60):
        async with relay_process(demo, tmp_path, b"placing 20 simulated") as (process, output):
            process.send_signal(signal.SIGINT)
            text = await read_to_end(process, output)
    assert process.returncode == 130, text
    assert "relay: stopped" in text and "Traceback" not in text, text
