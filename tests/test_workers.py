"""``relay serve --workers N``: the SO_REUSEPORT listeners, the connection handoff between
workers, per-agent limits across workers, and whole calls through a 2-worker relay."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import trio
from conftest import ACCOUNT_SID, AUTH_TOKEN
from relay_process import read_to_end, read_until, relay_process

from relay.control.cluster import WorkerIdentity, parse_tag
from relay.control.policies import CallPolicies
from relay.control.shared_slots import SharedSlots
from relay.http import workers
from relay.http.handoff import Handoff
from relay.media import headroom
from relay.protocol.signature import compute_signature
from relay.sim import simulator


def test_worker_tags() -> None:
    assert parse_tag("w1", 2) == 1
    assert parse_tag("w2", 2) is None  # no such worker
    assert parse_tag("ACabc", 2) is None and parse_tag("w", 2) is None
    assert parse_tag("w1x", 2) is None
    assert WorkerIdentity().tag == "" and not WorkerIdentity().clustered
    assert WorkerIdentity(1, 2, "/tmp/x").tag == "w1"


def test_resolve_workers() -> None:
    assert workers.resolve_workers("auto") == len(os.sched_getaffinity(0))
    assert workers.resolve_workers("3") == 3
    with pytest.raises(Exception, match="--workers"):
        workers.resolve_workers("zero")
    with pytest.raises(Exception, match="out of range"):
        workers.resolve_workers("0")


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 300:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        calls = headroom.raise_fd_limit()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert now == hard or hard == resource.RLIM_INFINITY
        assert calls == (now - headroom.FD_RESERVE) // headroom.FDS_PER_CALL
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_agent_limit_holds_across_workers(tmp_path: Path) -> None:
    # Two workers' policy state over one run directory: the last slot goes to one of them
    a = CallPolicies(shared=SharedSlots(str(tmp_path), 0))
    b = CallPolicies(shared=SharedSlots(str(tmp_path), 1))
    assert a.admit("CA1", "t", "desk", 2)
    assert b.admit("CA2", "t", "desk", 2)
    assert not a.admit("CA3", "t", "desk", 2) and not b.admit("CA4", "t", "desk", 2)
    assert b.admit("CA5", "t", "other", 2)  # another agent has its own slots
    assert a.admit("CA6", "t2", "desk", 2)  # ... and another tenant's agent too
    b.release("CA2")
    assert a.admit("CA7", "t", "desk", 2)
    assert SharedSlots(str(tmp_path), 9).total(("t", "desk")) == 2  # an observer
    a.release("CA1")
    a.release("CA1")  # idempotent
    assert a.shared is not None and a.shared.total(("t", "desk")) == 1
    # unlimited agents never touch the shared files
    assert a.admit("CA8", "t", "free", 0) and a.shared.total(("t", "free")) == 0


async def test_handoff_passes_the_socket_and_the_bytes_read(tmp_path: Path) -> None:
    sender, receiver = Handoff(str(tmp_path), 0), Handoff(str(tmp_path), 1)
    got: list[bytes] = []

    async def serve(stream: trio.SocketStream, prefix: bytes) -> None:
        got.append(prefix)
        await stream.send_all(b"served by worker 1: " + await stream.receive_some(100))
        await stream.aclose()

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(receiver.run, serve)
            client = await trio.open_tcp_stream("127.0.0.1", port)
            accepted = await listener.accept()
            # (the head the sender "read" travels with the socket)
            assert await sender.send(1, accepted, b"GET /twilio/stream/w1 HTTP/1.1\r\n\r\n")
            await client.send_all(b"hello")
            assert await client.receive_some(100) == b"served by worker 1: hello"
            assert got == [b"GET /twilio/stream/w1 HTTP/1.1\r\n\r\n"]
            # a worker that is not there: the connection stays with the sender
            other = await trio.open_tcp_stream("127.0.0.1", port)
            kept = await listener.accept()
            assert not await sender.send(5, kept, b"x")
            await kept.send_all(b"still mine")
            assert await other.receive_some(100) == b"still mine"
            await other.aclose()
            await kept.aclose()
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert sender.counts == {"sent": 1, "failed": 1} and receiver.counts == {"received": 1}
    sender.close()
    receiver.close()
    await listener.aclose()


def _signed_voice(base: str, call_sid: str) -> tuple[dict[str, str], dict[str, str]]:
    params = {
        "CallSid": call_sid,
        "AccountSid": ACCOUNT_SID,
        "From": "+14155550100",
        "To": "+14155550199",
        "Direction": "inbound",
    }
    sig = compute_signature(AUTH_TOKEN, base + "/twilio/voice", params)
    return params, {"X-Twilio-Signature": sig}


async def test_two_workers_serve_calls_end_to_end(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[twilio]\nauth_token = "{AUTH_TOKEN}"\naccount_sid = "{ACCOUNT_SID}"\n'
        f'[store]\nurl = "sqlite:///{db}"\n'
        "[server]\nadmission_max_lag_ms = 10000\ndrain_timeout_s = 3\n"  # shared cores
        '[agents.parrot]\ntype = "parrot"\ngreeting = true\nwarm_start = true\n'
        '[agents.limited]\ntype = "parrot"\nmax_concurrent_calls = 1\n'
        '[calls]\ndefault_agent = "parrot"\n'
        '[numbers]\n"+14155550199" = "limited"\n'
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "relay", "serve", "--workers", "2", "--port", "0"]
    command += ["--config", str(config)]
    log = bytearray()
    with trio.fail_after(90):
        process = await trio.lowlevel.open_process(
            command, stderr=subprocess.PIPE, env=env, cwd=str(tmp_path)
        )
        try:
            assert process.stderr is not None
            while log.count(b"relay listening") < 2:
                chunk = await process.stderr.receive_some(4096)
                assert chunk, log.decode()
                log += chunk
            match = re.search(rb"2 workers on port (\d+)", log)
            assert match, log.decode()
            base = f"http://127.0.0.1:{int(match.group(1))}"
            assert b"[w0]" in log and b"[w1]" in log

            async def drain_stderr() -> None:
                assert process.stderr is not None
                while chunk := await process.stderr.receive_some(4096):
                    log.extend(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain_stderr)
                results: list[Any] = []

                async def caller(i: int) -> None:
                    results.append(await simulator.place_call(base, AUTH_TOKEN, duration_s=2.0))

                async with trio.open_nursery() as calls:
                    for i in range(10):
                        calls.start_soon(caller, i)
                assert len(results) == 10
                assert all(r.call_sid and r.heard_ms > 0 for r in results), results

                # The limited agent (1 call) across workers: of 6 webhooks on 6 new
                # connections (the kernel spreads them), exactly one is answered.
                answered = 0
                for i in range(6):
                    params, headers = _signed_voice(base, f"CA{i:032d}")
                    async with httpx.AsyncClient() as client:
                        r = await client.post(base + "/twilio/voice", data=params, headers=headers)
                    assert r.status_code == 200
                    answered += "<Connect" in r.text
                assert answered == 1, log.decode()[-3000:]
                nursery.cancel_scope.cancel()
        finally:
            process.terminate()
            with trio.move_on_after(30):
                assert process.stderr is not None
                while chunk := await process.stderr.receive_some(4096):
                    log.extend(chunk)
                await process.wait()
            if process.returncode is None:
                process.kill()
    assert process.returncode == 0, log.decode()[-3000:]
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT call_sid, status, details FROM calls")).all()
    engine.dispose()
    done = [r for r in rows if r.status == "completed"]
    assert len(done) == 10
    # every stream met the agent session its webhook opened (warm start): the streams that
    # landed on the other worker were handed to the one that answered
    import json

    assert all(json.loads(r.details).get("warm_start") for r in done), [r.details for r in done]
    assert b"Traceback" not in log, log.decode()[-3000:]
    # ... and that happened: 10 streams and their status callbacks over 2 workers
    received = [int(n) for n in re.findall(rb"'received': (\d+)", log)]
    assert sum(received) >= 1, log.decode()[-3000:]


def test_reuseport_sockets_share_a_port() -> None:
    a, port = workers._reserve_port("127.0.0.1", 0)
    b = workers._reuseport_socket("127.0.0.1", port, socket.AF_INET)
    b.listen(8)
    c = workers._reuseport_socket("127.0.0.1", port, socket.AF_INET)
    c.listen(8)
    for s in (a, b, c):
        s.close()


LISTENING = b"relay listening"  # each worker's line once it serves


def _two_workers(tmp_path: Path) -> list[str]:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[twilio]\nauth_token = "{AUTH_TOKEN}"\n[store]\nurl = "sqlite:///{tmp_path}/relay.db"\n'
    )
    return ["serve", "--workers", "2", "--port", "0", "--config", str(config)]


async def _stop(process: trio.Process, log: bytearray, *signals: int) -> str:
    for signum in signals:
        process.send_signal(signum)
        await trio.sleep(0.3)
    return await read_to_end(process, log)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
async def test_workers_drain_on_sigterm_and_sighup(tmp_path: Path, signum: int) -> None:
    """The supervisor tells each worker once (they run in their own process group, so a
    terminal's signal reaches only it); SIGHUP, the terminal closing, drains like SIGTERM."""
    with trio.fail_after(60):
        async with relay_process(_two_workers(tmp_path), tmp_path, LISTENING, 2) as (process, log):
            text = await _stop(process, log, signum)
    assert process.returncode == 0, text
    assert text.count("SIGTERM: draining") == 2, text
    assert "relay: stopped" in text and "Traceback" not in text, text


async def test_second_signal_stops_draining_workers_without_waiting(tmp_path: Path) -> None:
    """SIGTERM drains (a call in progress holds the workers for up to drain_timeout_s = 30 s);
    Ctrl-C then, forwarded to each worker once, stops them without waiting."""
    with trio.fail_after(60):
        async with relay_process(_two_workers(tmp_path), tmp_path, LISTENING, 2) as (process, log):
            port = int(re.search(rb"2 workers on port (\d+)", log).group(1))  # type: ignore[union-attr]
            async with trio.open_nursery() as nursery:

                async def caller() -> None:
                    with trio.move_on_after(40):
                        await simulator.place_call(
                            f"http://127.0.0.1:{port}", AUTH_TOKEN, duration_s=30.0
                        )

                nursery.start_soon(caller)
                await trio.sleep(2)  # the call is up: webhook answered, stream open
                process.send_signal(signal.SIGTERM)
                draining = rb"no new calls; (1 active|0 active, 1 answered)"
                await read_until(process, log, lambda: re.search(draining, log) is not None)
                with trio.fail_after(15):  # not the 30 s drain
                    text = await _stop(process, log, signal.SIGINT)
                nursery.cancel_scope.cancel()
    assert process.returncode == 0, text
    assert "relay: stopped" in text and "Traceback" not in text, text


async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """Workers run in their own process group, so a SIGKILLed supervisor tells no one: each
    worker asked the kernel for SIGTERM on its parent's death (prctl PR_SET_PDEATHSIG) and
    drains out instead of serving on alone."""
    with trio.fail_after(60):
        async with relay_process(_two_workers(tmp_path), tmp_path, LISTENING, 2) as (process, _):
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
            assert len(children.split()) == 2, children
            process.kill()
            await process.wait()
            while any(_running(pid) for pid in children.split()):
                await trio.sleep(0.1)


def _running(pid: str) -> bool:
    """Alive and not a zombie (an orphan's exit waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
