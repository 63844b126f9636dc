"""Exactly once, in order, in ordinary use and under the faults the review found.

Each test is one defect of the delivery issue, on real processes:

1. one client in two rooms whose owners are different brokers (no fault at all);
2. the TCP connections of the room owner's ZeroMQ port reset (``ss -K``) mid-stream;
3. a client resending the same request (same ``id``) while the owner fails over, and
   again from a new connection after resuming.

"Nothing else arrived" is checked by reading up to a marker sent after everything else.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from typing import Any

import pytest
import websockets

from signalpost.client import PeerJoined, SignalEvent, SignalpostClient
from signalpost.placement import owner
from tests.binaries import require_binary
from tests.cluster.conftest import Cluster, ClusterFactory
from tests.helpers import RawClient, raw_client, token

pytestmark = pytest.mark.cluster

FAST_CLIENTS = {
    "SIGNALPOST_RATE_PER_SECOND": "100000",
    "SIGNALPOST_RATE_BURST": "100000",
    "SIGNALPOST_ROOM_CAPACITY": "8",
}


def _rooms_on_distinct_owners(cluster: Cluster, count: int) -> list[str]:
    endpoints = sorted(cluster.brokers())
    chosen: dict[str, str] = {}
    for n in range(1000):
        room = f"room-{n}"
        chosen.setdefault(owner(room, endpoints), room)
        if len(chosen) == count:
            return list(chosen.values())
    raise AssertionError("no rooms on distinct owners")


async def _until_markers(
    client: SignalpostClient, markers: set[str], timeout: float = 20.0
) -> list[SignalEvent]:
    """Signal events up to and including one marker per room in ``markers``."""
    events: list[SignalEvent] = []
    waiting = set(markers)
    while waiting:
        event = await client.next_event(SignalEvent, timeout=timeout)
        events.append(event)
        if event.data.get("marker"):
            waiting.discard(event.room)
    return events


def _check_exactly_once_in_order(events: list[SignalEvent], sent: dict[str, list[int]]) -> None:
    got: dict[str, list[int]] = {room: [] for room in sent}
    for event in events:
        if not event.data.get("marker"):
            got[event.room].append(event.data["n"])
    for room, numbers in sent.items():
        seen = got[room]
        missing = sorted(set(numbers) - set(seen))
        twice = sorted({n for n in seen if seen.count(n) > 1})
        pairs = enumerate(zip(seen, numbers, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), 0)
        around = seen[max(0, first - 3) : first + 5]
        assert seen == numbers, (room, f"missing {missing[:20]}", f"twice {twice[:20]}", around)


@pytest.mark.parametrize("senders", [1, 2], ids=["pipelined", "two-senders-awaiting-acks"])
async def test_one_client_in_two_rooms_on_two_brokers_gets_every_signal(
    cluster_factory: ClusterFactory, senders: int
) -> None:
    cluster = cluster_factory(edges=2, brokers=2, **FAST_CLIENTS)
    edge1, edge2 = cluster.edge_urls
    rooms = _rooms_on_distinct_owners(cluster, 2)
    total = 400
    async with SignalpostClient(edge2, token("bob"), request_timeout=15) as bob:
        clients = [
            SignalpostClient(edge1, token(f"alice{n}"), request_timeout=15) for n in range(senders)
        ]
        for alice in clients:
            await alice.connect()
        for room in rooms:
            await bob.join(room)
            for alice in clients:
                await alice.join(room)
        assert bob.session is not None
        sent: dict[str, list[int]] = {room: [] for room in rooms}
        plan = [(n, rooms[n % 2], clients[(n // 2) % senders]) for n in range(total)]
        for n, room, _alice in plan:
            sent[room].append(n)
        if senders == 1:
            await asyncio.gather(
                *(alice.signal(room, {"n": n}, to=bob.session) for n, room, alice in plan)
            )
        else:

            async def send_in_turn(mine: SignalpostClient) -> None:
                for n, room, alice in plan:
                    if alice is mine:
                        await alice.signal(room, {"n": n}, to=bob.session)

            await asyncio.gather(*(send_in_turn(alice) for alice in clients))
        for room in rooms:
            await clients[0].signal(room, {"marker": True}, to=bob.session)
        events = await _until_markers(bob, set(rooms))
        if senders == 1:
            _check_exactly_once_in_order(events, sent)
        else:
            # In order per (sender, room); every one exactly once.
            for alice in clients:
                mine = [e for e in events if e.sender.session == alice.session]
                theirs = {r: [n for n, room, a in plan if a is alice and room == r] for r in rooms}
                _check_exactly_once_in_order(mine, theirs)
        for alice in clients:
            await alice.close()


def _reset_connections_to(port: int) -> None:
    """Reset every TCP connection to ``port`` on loopback (both ends see it die)."""
    ss = require_binary("ss")
    subprocess.run(
        [ss, "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"],
        check=True,
        capture_output=True,
    )


def _port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


async def test_tcp_resets_of_the_owners_links_lose_nothing(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(edges=2, brokers=2, **FAST_CLIENTS)
    edge1, edge2 = cluster.edge_urls
    (room,) = _rooms_on_distinct_owners(cluster, 1)
    endpoint = owner(room, sorted(cluster.brokers()))
    total, window = 3000, 512
    async with (
        SignalpostClient(edge1, token("alice"), request_timeout=20) as alice,
        SignalpostClient(edge2, token("bob"), request_timeout=20) as bob,
    ):
        await alice.join(room)
        await bob.join(room)
        await alice.next_event(PeerJoined)
        assert bob.session is not None
        in_flight: set[asyncio.Task[Any]] = set()
        for n in range(total):
            if n % 250 == 125:
                _reset_connections_to(_port_of(endpoint))  # mid-stream, requests in flight
            task = asyncio.create_task(alice.signal(room, {"n": n}, to=bob.session))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            if len(in_flight) >= window:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*in_flight)  # every one acked (raises otherwise)
        await alice.signal(room, {"marker": True}, to=bob.session)
        events = await _until_markers(bob, {room}, timeout=30)
        _check_exactly_once_in_order(events, {room: list(range(total))})


async def test_a_resent_request_is_applied_once_across_failover_and_resume(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(edges=2, brokers=2, **FAST_CLIENTS)
    edge1, edge2 = cluster.edge_urls
    (room,) = _rooms_on_distinct_owners(cluster, 1)
    doomed = cluster.owner_of(room)
    alice = await raw_client(edge1, "alice")
    async with SignalpostClient(edge2, token("bob"), request_timeout=15) as bob:
        assert (await alice.request({"type": "join", "id": "j", "room": room}))["type"] == "joined"
        await bob.join(room)
        await alice.recv_type("peer-joined")
        frame = {"type": "signal", "id": "once", "room": room, "to": bob.session, "data": {"n": 1}}
        # The owner dies with the request in flight; the client, tired of waiting, resends.
        await alice.send(frame)
        cluster.kill(doomed)
        for _ in range(3):
            await asyncio.sleep(0.3)
            await alice.send(frame)
        acks = [await alice.recv_type("ack", timeout=15) for _ in range(4)]
        assert {a["id"] for a in acks} == {"once"}
        # The connection drops; the session resumes on the other edge and resends again.
        assert alice.ws.transport is not None
        alice.ws.transport.abort()
        resumed = RawClient(await websockets.connect(edge2))
        await resumed.send(
            {"type": "hello", "token": token("alice"), "resume": alice.welcome["resume"]}
        )
        assert (await resumed.recv_type("welcome"))["resumed"] is True
        await resumed.send(frame)
        answer: dict[str, Any] = {}
        while answer.get("type") != "ack":  # the room's recovered report may come first
            answer = await resumed.recv(timeout=15)
            assert answer["type"] in ("ack", "recovered"), answer
        assert answer["id"] == "once"
        marker = {"type": "signal", "id": "m", "room": room, "to": bob.session, "data": {}}
        await resumed.send({**marker, "data": {"marker": True}})
        events = await _until_markers(bob, {room})
        assert [e.data for e in events] == [{"n": 1}, {"marker": True}]


@pytest.mark.parametrize("consul", ["off", "on"])
async def test_signals_sent_while_the_only_broker_restarts_are_acked_not_refused(
    cluster_factory: ClusterFactory, consul: str
) -> None:
    """The room's only broker is killed (-9) and restarted at the same address, empty,
    faster than the heartbeat expiry: the signals sent meanwhile reach it only after the
    edges re-announced the room's members, so they are acked and delivered, not refused
    ``not_in_room`` or ``unknown_peer`` (both happened: requests the edge sent before it
    heard the new run, and a resend that overtook the re-announcement of its target)."""
    cluster = cluster_factory(edges=2, brokers=1, restart=True, consul=consul)
    edge1, edge2 = cluster.edge_urls
    async with (
        SignalpostClient(edge1, token("alice"), request_timeout=20) as alice,
        SignalpostClient(edge2, token("bob"), request_timeout=20) as bob,
    ):
        await alice.join("restarted")
        await bob.join("restarted")
        await alice.signal("restarted", {"n": 0}, to=bob.session)
        (broker,) = cluster.of_kind("broker")
        cluster.kill(broker["id"], signal.SIGKILL)
        sent = [asyncio.create_task(alice.signal("restarted", {"n": 1}, to=bob.session))]
        for n in range(2, 6):  # pipelined, while the broker is down and comes back
            await asyncio.sleep(0.1)
            sent.append(asyncio.create_task(alice.signal("restarted", {"n": n}, to=bob.session)))
        outcomes = await asyncio.gather(*sent, return_exceptions=True)
        assert [repr(o) for o in outcomes if isinstance(o, BaseException)] == []
        deadline = time.monotonic() + 20
        while cluster.pid(broker["id"]) == broker["pid"]:
            assert time.monotonic() < deadline, "the broker was not restarted"
            await asyncio.sleep(0.2)
            cluster.reload()
        got = [(await bob.next_event(SignalEvent, timeout=10)).data["n"] for _ in range(6)]
        assert sorted(got) == list(range(6)), got
