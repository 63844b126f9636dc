"""The server API on a real cluster: rooms listed across brokers, publishes applied
exactly once across retries and a broker kill -9, kick revoking the resume on every edge,
close reaching members on every edge."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import websockets

from signalpost.admin import AdminClient
from signalpost.api_keys import ALL_SCOPES, mint_api_key
from signalpost.client import PeerJoined, SignalEvent, SignalpostClient
from signalpost.errors import NotFound
from tests.cluster.conftest import ClusterFactory
from tests.helpers import SECRET, RawClient, raw_client, token

pytestmark = pytest.mark.cluster

FAST_CLIENTS = {"SIGNALPOST_RATE_PER_SECOND": "100000", "SIGNALPOST_RATE_BURST": "100000"}


def admin(edge_url: str) -> AdminClient:
    base = edge_url.replace("ws://", "http://").removesuffix("/v1/signal")
    key = mint_api_key(SECRET, "backend", ALL_SCOPES, now=time.time())
    return AdminClient(base, key, timeout=15, retries=5)


async def test_list_rooms_pages_across_every_broker(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(edges=2, brokers=3)
    edge1, edge2 = cluster.edge_urls
    # Four rooms on each broker (placement hashes the brokers' addresses, picked anew
    # each run: twelve names taken at random left a broker with none about 2% of runs).
    by_owner: dict[str, list[str]] = {}
    for n in range(200):
        by_owner.setdefault(cluster.owner_of(f"listed-{n:03d}"), []).append(f"listed-{n:03d}")
    assert len(by_owner) == 3
    names = sorted(name for owned in by_owner.values() for name in owned[:4])
    for n, name in enumerate(names):
        client = await raw_client(edge1 if n % 2 else edge2, f"user-{n}")
        joined = await client.request({"type": "join", "id": 1, "room": name})
        assert joined["type"] == "joined"
    api = admin(edge1)
    first = await asyncio.to_thread(api.list_rooms, 5)
    assert [r["name"] for r in first["rooms"]] == names[:5] and first["next_cursor"]
    listed = await asyncio.to_thread(lambda: [r["name"] for r in api.iter_rooms(5)])
    assert listed == names  # every room once, in name order, across 3 pages
    room = await asyncio.to_thread(admin(edge2).room, names[3])
    assert [m["user"] for m in room["members"]] == ["user-3"]


async def test_publish_exactly_once_across_retries_and_a_broker_kill_9(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(edges=2, brokers=3, **FAST_CLIENTS)
    edge1, edge2 = cluster.edge_urls
    room = "published-room"
    doomed = cluster.owner_of(room)
    api1, api2 = admin(edge1), admin(edge2)
    count = 40
    async with (
        SignalpostClient(edge1, token("alice"), request_timeout=10) as alice,
        SignalpostClient(edge2, token("bob"), request_timeout=10) as bob,
    ):
        await alice.join(room)
        await bob.join(room)
        await alice.next_event(PeerJoined)
        answers: dict[int, dict[str, Any]] = {}

        def publish_all() -> None:
            for n in range(count):
                if n == count // 2:
                    cluster.kill(doomed)
                key = f"pub-{n}"
                answers[n] = api1.publish(room, {"n": n}, idempotency_key=key)
                # The caller retries (lost answer, timeout): on another edge, same key.
                again = api2.publish(room, {"n": n}, idempotency_key=key)
                assert again == answers[n], (n, again, answers[n])

        await asyncio.to_thread(publish_all)
        assert not cluster.alive(doomed)
        await asyncio.to_thread(lambda: api2.publish(room, {"marker": True}))
        for client in (alice, bob):
            got = []
            while True:
                event = await client.next_event(SignalEvent, timeout=15)
                if event.data.get("marker"):
                    break
                got.append(event.data["n"])
            assert got == list(range(count))  # each once, in order, across the kill
        offsets = [answers[n]["offset"] for n in range(count)]
        assert offsets == sorted(set(offsets))


async def test_kick_revokes_the_resume_on_every_edge(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(edges=2, brokers=2, presence=2)
    edge1, edge2 = cluster.edge_urls
    alice = await raw_client(edge1, "alice")
    bob = await raw_client(edge2, "bob")
    for client in (alice, bob):
        assert (await client.request({"type": "join", "id": 1, "room": "kick-room"}))["type"]
    await alice.recv_type("peer-joined")
    kicked = await asyncio.to_thread(lambda: admin(edge1).kick("bob", bob.session, "banned"))
    assert kicked == [bob.session]
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await bob.ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4410
    left = await alice.recv_type("peer-left", timeout=10)
    assert left["peer"]["session"] == bob.session
    for edge in (edge1, edge2):
        again = await raw_client(edge, "bob", resume=bob.welcome["resume"])
        assert again.welcome["resumed"] is False and again.session != bob.session
    presence = await asyncio.to_thread(admin(edge2).presence, "bob", "alice")
    by_user = {u["user"]: u for u in presence}
    assert bob.session not in {s["session"] for s in by_user["bob"]["sessions"]}
    assert by_user["alice"]["status"] == "online"


async def test_close_room_reaches_members_on_every_edge(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(edges=2, brokers=2)
    edge1, edge2 = cluster.edge_urls
    room = "closing-room"
    alice = await raw_client(edge1, "alice")
    bob = await raw_client(edge2, "bob")
    for client in (alice, bob):
        assert (await client.request({"type": "join", "id": 1, "room": room}))["type"]
    await alice.recv_type("peer-joined")
    closed = await asyncio.to_thread(lambda: admin(edge2).close_room(room, "done"))
    for client in (alice, bob):
        event = await client.recv_type("room-closed", timeout=10)
        assert event["offset"] == closed["offset"] and event["reason"] == "done"
    deadline = time.monotonic() + 10
    while True:
        try:
            await asyncio.to_thread(admin(edge1).room, room)
        except NotFound:
            break
        assert time.monotonic() < deadline, "the members did not leave"
        await asyncio.sleep(0.1)


async def test_a_member_away_at_close_leaves_when_it_resumes_on_another_edge(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(edges=2, brokers=2)
    edge1, edge2 = cluster.edge_urls
    room = "closed-while-away"
    alice = await raw_client(edge1, "alice")
    bob = await raw_client(edge2, "bob")
    for client in (alice, bob):
        assert (await client.request({"type": "join", "id": 1, "room": room}))["type"]
    await alice.recv_type("peer-joined")
    info = await asyncio.to_thread(admin(edge1).room, room)
    assert bob.ws.transport is not None
    bob.ws.transport.abort()  # bob is away...
    deadline = time.monotonic() + 10
    while True:  # ... as the owner sees it
        members = (await asyncio.to_thread(admin(edge1).room, room))["members"]
        if not all(m["connected"] for m in members):
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    await asyncio.to_thread(lambda: admin(edge1).close_room(room, "gone"))
    assert (await alice.recv_type("room-closed", timeout=10))["reason"] == "gone"
    raw = RawClient(await websockets.connect(edge1))
    await raw.send(
        {
            "type": "hello",
            "token": token("bob"),
            "resume": bob.welcome["resume"],
            "rooms": {room: {"epoch": info["epoch"], "offset": info["offset"]}},
        }
    )
    assert (await raw.recv_type("welcome"))["resumed"] is True
    assert (await raw.recv_type("room-closed", timeout=10))["reason"] == "gone"
    deadline = time.monotonic() + 10
    while True:  # bob's new edge left for him: the room is gone
        try:
            await asyncio.to_thread(admin(edge2).room, room)
        except NotFound:
            break
        assert time.monotonic() < deadline, "bob did not leave"
        await asyncio.sleep(0.1)
