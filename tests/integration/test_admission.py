"""Connection caps and the accept rate at a real edge, over real WebSockets (4503)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from edge.server import EdgeServer
from signalpost import metrics
from signalpost.client import Disconnected, Resumed, SignalpostClient, TryAgainLater
from signalpost.errors import CloseCode
from tests.helpers import raw_client, token, url_of
from tests.integration.conftest import DevFactory


async def refused(url: str, user: str, **hello: Any) -> tuple[int, str]:
    """Open, say hello, and return the close code and reason the edge answered with."""
    async with websockets.connect(url) as ws:
        try:
            await ws.send(json.dumps({"type": "hello", "token": token(user), **hello}))
            frame = await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosed as exc:
            assert exc.rcvd is not None
            return exc.rcvd.code, exc.rcvd.reason
        raise AssertionError(f"not refused: {frame}")


def refusals(kind: str) -> float:
    value = metrics.REGISTRY.get_sample_value("signalpost_admission_refused_total", {"kind": kind})
    return value or 0.0


def retry_ms(reason: str) -> int:
    head, _, _kind = reason.partition(" ")
    name, _, value = head.partition("=")
    assert name == "retry_after_ms", reason
    return int(value)


async def test_the_ip_cap_refuses_the_connection_over_it_with_4503(
    dev_factory: DevFactory,
) -> None:
    dev = await dev_factory(max_connections_per_ip=2, connection_cap_exempt=[], cap_retry_after=3.0)
    url = url_of(dev)
    before = refusals("ip_cap")
    first = await raw_client(url, "u1")
    await raw_client(url, "u2")
    code, reason = await refused(url, "u3")
    assert code == CloseCode.TRY_AGAIN_LATER == 4503
    assert reason == "retry_after_ms=3000 ip_cap"
    assert refusals("ip_cap") == before + 1
    await first.close()
    for _ in range(100):  # the edge frees the slot when it sees the close
        if dev.admission.per_ip.get("127.0.0.1", 0) < 2:
            break
        await asyncio.sleep(0.02)
    third = await raw_client(url, "u3")
    assert third.welcome["resumed"] is False


async def test_past_twice_the_ip_cap_a_connection_is_dropped_at_accept(
    dev_factory: DevFactory,
) -> None:
    dev = await dev_factory(max_connections_per_ip=1, connection_cap_exempt=[])
    url = url_of(dev)
    before = refusals("ip_dropped")
    await raw_client(url, "u1")
    # A second TCP connection that sends nothing: counted (from accept) while it lasts.
    _reader, idle = await asyncio.open_connection("127.0.0.1", dev.port)
    for _ in range(100):
        if dev.admission.per_ip.get("127.0.0.1") == 2:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(Exception) as dropped:
        async with asyncio.timeout(5):
            await websockets.connect(url)  # no handshake: the TCP connection is dropped
    assert not isinstance(dropped.value, TimeoutError)
    assert refusals("ip_dropped") == before + 1
    assert dev.admission.per_ip == {"127.0.0.1": 2}  # the dropped one was not counted
    idle.close()


async def test_loopback_is_exempt_by_default(dev: EdgeServer) -> None:
    url = url_of(dev)
    dev.admission.max_per_ip = 1  # (the default cap is 1000) loopback is not counted
    for user in ("a", "b", "c"):
        await raw_client(url, user)
    assert dev.admission.per_ip == {}


async def test_the_user_cap_refuses_a_third_session_but_not_a_resume_held_here(
    dev_factory: DevFactory,
) -> None:
    dev = await dev_factory(max_sessions_per_user=2)
    url = url_of(dev)
    before = refusals("user_cap")
    alice = await raw_client(url, "alice")
    await raw_client(url, "alice")
    code, reason = await refused(url, "alice")
    assert code == 4503 and reason.endswith(" user_cap") and retry_ms(reason) == 5000
    assert refusals("user_cap") == before + 1
    await raw_client(url, "bob")  # another user is not affected
    # A resume of a session this edge holds replaces its connection: not refused.
    again = await raw_client(url, "alice", resume=alice.welcome["resume"])
    assert again.welcome["resumed"] is True and again.session == alice.session


async def test_in_a_storm_every_resume_is_admitted_and_fresh_hellos_are_shed(
    dev_factory: DevFactory,
) -> None:
    # 16 tokens, 8 of them reserved for resumes, refilled at 0.05 a second (slow enough
    # that no fresh hello gets in during the test, even on a slow machine).
    dev = await dev_factory(accept_rate=0.05, accept_burst=16, accept_resume_share=0.5)
    url = url_of(dev)
    users = [f"storm-{i}" for i in range(8)]
    clients = [await raw_client(url, user) for user in users]  # the bucket is at 8 now
    for client in clients:
        assert client.ws.transport is not None
        client.ws.transport.abort()  # the edge "died" under them: sessions suspended
    for _ in range(100):
        if not dev.sessions:
            break
        await asyncio.sleep(0.02)
    shed_before = refusals("shed")

    async def resume(index: int) -> dict[str, Any]:
        client = await raw_client(url, users[index], resume=clients[index].welcome["resume"])
        return client.welcome

    storm: list[Any] = []
    for index in range(8):  # resumes and fresh sessions interleaved, all at once
        storm.append(resume(index))
        storm.append(refused(url, f"fresh-{index}"))
        storm.append(refused(url, f"fresh-{index}b"))
    results = await asyncio.gather(*storm)
    welcomes = results[0::3]
    assert all(w["resumed"] is True for w in welcomes)
    assert [w["session"] for w in welcomes] == [c.session for c in clients]
    sheds = results[1::3] + results[2::3]
    assert all(code == 4503 and reason.endswith(" shed") for code, reason in sheds)
    delays = sorted(retry_ms(reason) for _, reason in sheds)
    assert delays[0] >= 1000 and delays[-1] > delays[0]  # spread out, not all at once
    assert refusals("shed") == shed_before + 16


async def test_the_sdk_waits_out_a_4503_and_its_session_resumes(
    dev_factory: DevFactory,
) -> None:
    # Two tokens, none reserved, refilled at 2 a second.
    dev = await dev_factory(accept_rate=2.0, accept_burst=2, accept_resume_share=0.0)
    url = url_of(dev)
    client = SignalpostClient(url, token("sdk-user"))
    await client.connect()
    await client.join("room-1")
    await raw_client(url, "someone-else")  # the bucket is empty now
    before = refusals("shed_resume")
    session = client.session
    assert session is not None
    server_side = dev.sessions[session]
    dropped_at = time.monotonic()
    server_side.link.abort()  # the connection drops: the SDK reconnects at once
    disconnected = await client.next_event(Disconnected)
    assert disconnected.final is False
    resumed = await client.next_event(Resumed, timeout=15)
    waited = time.monotonic() - dropped_at
    assert resumed.resumed is True and resumed.session == session
    # Shed once, told to come back in about a second (a token at 2/s, and itself): the
    # SDK waited that out (with jitter) and got in at the next try. (Its plain backoff,
    # 0.1 s and doubling, would have been shed again and again.)
    assert refusals("shed_resume") == before + 1
    assert waited >= 0.9
    await client.ping()
    await client.close()


async def test_the_sdk_retries_connect_after_a_4503_and_gives_up_when_told_to(
    dev_factory: DevFactory,
) -> None:
    dev = await dev_factory(max_sessions_per_user=1, cap_retry_after=0.2, accept_rate=1000.0)
    url = url_of(dev)
    holder = await raw_client(url, "carol")
    patient = SignalpostClient(url, token("carol"), max_reconnect_attempts=50)
    connecting = asyncio.create_task(patient.connect())
    await asyncio.sleep(0.5)
    assert not connecting.done()  # refused (user cap), waiting to try again
    await holder.close()
    welcome = await asyncio.wait_for(connecting, 10)
    assert welcome["resumed"] is False
    impatient = SignalpostClient(url, token("carol"), max_reconnect_attempts=2)
    with pytest.raises(TryAgainLater) as refused_info:
        await impatient.connect()
    assert refused_info.value.retry_after == 0.2
    await patient.close()
