"""Webhooks from a real cluster to a real HTTP receiver, across a broker kill -9, a
broker's SIGTERM (its rooms handed over), an edge kill and a presence node's kill -9:
signatures verify, every event arrives (duplicates only under the same key), and each
room's (each user's) events arrive in order."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from signalpost.client import RequestRefused, SignalpostClient
from tests.cluster.conftest import Cluster, ClusterFactory
from tests.helpers import token
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.cluster

SECRET = "cluster-webhook-secret"
ROOMS = 6
CYCLES = 15
#: The kill comes once this many joins were answered (of 2 x CYCLES x ROOMS).
KILL_AFTER = 2 * CYCLES * ROOMS // 3
FAST = {
    "SIGNALPOST_RATE_PER_SECOND": "100000",
    "SIGNALPOST_RATE_BURST": "100000",
    "SIGNALPOST_WEBHOOK_SECRET": SECRET,
    "SIGNALPOST_WEBHOOK_RETRY_BASE": "0.05",
    "SIGNALPOST_WEBHOOK_RETRY_MAX": "0.5",
    "SIGNALPOST_WEBHOOK_MAX_ATTEMPTS": "1000",
}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver(SECRET)
    await rx.start()
    yield rx
    await rx.stop()


async def _churn(
    alice: SignalpostClient,
    bob: SignalpostClient,
    room: str,
    joins: list[tuple[str, str, str]],
    progress: list[int],
    kill: asyncio.Event,
) -> None:
    """Both join, both leave, CYCLES times; every join's (session, epoch, offset) noted."""
    for _ in range(CYCLES):
        for client in (alice, bob):
            joined = await client.join(room)
            assert client.session
            joins.append((client.session, joined["epoch"], joined["offset"]))
            progress[0] += 1
            if progress[0] == KILL_AFTER:
                kill.set()
        for client in (bob, alice):
            try:
                await client.leave(room)
            except RequestRefused as exc:  # (a leave the room lost: the test says so)
                raise AssertionError(f"{room}: leave refused: {exc}") from None


def _check_room(receiver: Receiver, room: str, joins: list[tuple[str, str, str]]) -> None:
    events = receiver.of_stream(f"room:{room}:")
    joined_at = {
        (e["peer"]["session"], e["epoch"], e["offset"])
        for e in events
        if e["type"] == "peer.joined"
    }
    for session, epoch, offset in joins:
        # A join's answer names the position its stream starts at: its own peer-joined,
        # or (a join resent to a successor that already had the member) later.
        assert any((s, e) == (session, epoch) and o <= int(offset) for s, e, o in joined_at), (
            f"no peer.joined for {session} in {room} epoch {epoch} at or before {offset}"
        )
    kinds = Counter(str(e["type"]) for e in events)
    summary = "\n".join(
        f"{str(e['id']).split(':', 2)[2]} {e.get('peer', {}).get('user', '')} {e.get('reason', '')}"
        for e in events
    )
    assert kinds["peer.joined"] == kinds["peer.left"] == 2 * CYCLES, (
        f"{room}: {kinds}\n{summary}\njoins: {joins}"
    )
    assert kinds["room.started"] == kinds["room.ended"], (room, kinds)
    # In order: within an epoch the offsets only grow, a room starts before its first
    # join and ends after its last leave.
    last: dict[str, int] = {}
    for event in events:
        epoch, offset = str(event["epoch"]), int(event["offset"])
        assert offset >= last.get(epoch, 0), f"{room}: {event['id']} after offset {last[epoch]}"
        last[epoch] = offset
    for event in events:
        if event["type"] == "room.started":
            joined = f"room:{room}:{event['epoch']}:{event['offset']}"
            order = [str(e["id"]) for e in events]
            assert order.index(str(event["id"])) < order.index(joined)


async def _run(cluster: Cluster, receiver: Receiver, kill: str) -> None:
    edge1, edge2 = cluster.edge_urls
    rooms = [f"hook-room-{i}" for i in range(ROOMS)]
    joins: dict[str, list[tuple[str, str, str]]] = {room: [] for room in rooms}
    async with (
        SignalpostClient([edge1, edge2], token("alice"), request_timeout=15) as alice,
        SignalpostClient([edge2, edge1], token("bob"), request_timeout=15) as bob,
    ):
        progress, killing = [0], asyncio.Event()
        work = asyncio.gather(
            *(_churn(alice, bob, room, joins[room], progress, killing) for room in rooms)
        )
        await killing.wait()  # a third of the cycles done, the rest under way
        if kill in ("broker", "broker-sigterm"):
            owners = Counter(cluster.owner_of(room) for room in rooms)
            sig = signal.SIGTERM if kill == "broker-sigterm" else signal.SIGKILL
            cluster.kill(owners.most_common(1)[0][0], sig)
        else:
            cluster.kill(cluster.of_kind("edge")[0]["id"])
        assert progress[0] < 2 * CYCLES * ROOMS * 2 // 3, "the kill came too late"
        await work

    def complete() -> bool:
        return all(
            Counter(str(e["type"]) for e in receiver.of_stream(f"room:{room}:"))["peer.left"]
            >= 2 * CYCLES
            for room in rooms
        )

    try:
        await receiver.wait_for(complete, timeout=30)
    except TimeoutError:
        for room in rooms:  # what is missing, to the failure's report
            _check_room(receiver, room, joins[room])
        raise
    await asyncio.sleep(0.5)  # stragglers (copies a successor sends again) come in too
    assert receiver.bad == []
    differ = receiver.duplicates_differ()
    assert differ == [], [e for e in receiver.events if e["id"] in differ]
    for room in rooms:
        _check_room(receiver, room, joins[room])


@pytest.mark.parametrize("kill", ["broker", "edge", "broker-sigterm"])
async def test_every_room_event_arrives_in_order_across_a_kill(
    cluster_factory: ClusterFactory, receiver: Receiver, kill: str
) -> None:
    cluster = cluster_factory(edges=2, brokers=3, SIGNALPOST_WEBHOOK_URLS=receiver.url, **FAST)
    await _run(cluster, receiver, kill)
    # Presence: both users were online (the presence node sends those too).
    users: dict[str, Any] = {str(e["user"]): e for e in receiver.unique().values() if "user" in e}
    assert {"alice", "bob"} <= users.keys()


async def test_user_events_arrive_in_order_across_a_presence_kill(
    cluster_factory: ClusterFactory, receiver: Receiver
) -> None:
    # Two presence nodes: kill -9 the one that owns the first user while every user is
    # online; then half the users leave. Each user's webhooks: online, then (for those who
    # left) offline with a higher version, whoever owned them when it happened.
    # A goodbye sent to the killed node is lost: its user goes offline one resume window
    # after the successor took the lease over (docs/reliability.md, presence): 3 s here.
    cluster = cluster_factory(
        edges=2,
        brokers=1,
        presence=2,
        SIGNALPOST_WEBHOOK_URLS=receiver.url,
        SIGNALPOST_RESUME_WINDOW="3",
        **FAST,
    )
    edge1, edge2 = cluster.edge_urls
    users = [f"hook-user-{i}" for i in range(8)]
    doomed = cluster.presence_owner_of(users[0])
    clients = [SignalpostClient([edge1, edge2], token(user), request_timeout=15) for user in users]
    for client in clients:
        await client.connect()

    def online(user: str) -> bool:
        return any(e["type"] == "user.online" for e in receiver.of_stream(f"user:{user}:"))

    await receiver.wait_for(lambda: all(online(u) for u in users), timeout=20)
    cluster.kill(doomed)
    for client in clients[:4]:
        await client.close()

    def settled() -> bool:
        return all(
            [e["type"] for e in receiver.of_stream(f"user:{u}:")][-1] == "user.offline"
            for u in users[:4]
        )

    try:
        await receiver.wait_for(settled, timeout=30)
    except TimeoutError:
        seen = {
            u: [(e["type"], e["version"]) for e in receiver.of_stream(f"user:{u}:")] for u in users
        }
        raise AssertionError(f"not all offline: {seen}") from None
    for user in users:
        events = receiver.of_stream(f"user:{user}:")
        versions = [int(e["version"]) for e in events]
        assert versions == sorted(versions), (user, events)
        assert events[0]["type"] == "user.online", (user, events)
        if user in users[:4]:
            assert events[-1]["type"] == "user.offline", (user, events)
        else:
            assert [e["type"] for e in events] == ["user.online"], (user, events)
    assert receiver.bad == [] and receiver.duplicates_differ() == []
    for client in clients[4:]:
        await client.close()
