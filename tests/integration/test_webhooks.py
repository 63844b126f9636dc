"""Webhooks from dev mode (``signalpost dev``: one process) to a real HTTP receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.helpers import raw_client, url_of
from tests.integration.conftest import DevFactory
from tests.webhook_receiver import Receiver

SECRET = "webhook-test-secret"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rx = Receiver(SECRET)
    await rx.start()
    yield rx
    await rx.stop()


def kinds(events: list[dict[str, object]]) -> list[object]:
    return [e["type"] for e in events]


async def test_dev_mode_sends_signed_room_and_presence_events_in_order(
    dev_factory: DevFactory, receiver: Receiver
) -> None:
    dev = await dev_factory(webhook_urls=[receiver.url], webhook_secret=SECRET)
    alice = await raw_client(url_of(dev), "alice")
    bob = await raw_client(url_of(dev), "bob")
    assert (await alice.request({"type": "join", "id": 1, "room": "r1"}))["type"] == "joined"
    assert (await bob.request({"type": "join", "id": 2, "room": "r1"}))["type"] == "joined"
    await alice.recv_type("peer-joined")
    assert (await bob.request({"type": "leave", "id": 3, "room": "r1"}))["type"] == "left"
    await alice.request({"type": "leave", "id": 4, "room": "r1"})

    def room_done() -> bool:
        return len(receiver.of_stream("room:r1:")) == 6

    await receiver.wait_for(room_done)
    room = receiver.of_stream("room:r1:")
    assert kinds(room) == [
        "room.started", "peer.joined", "peer.joined", "peer.left", "peer.left", "room.ended",
    ]  # fmt: skip
    assert [e["peer"]["user"] for e in room[1:5]] == ["alice", "bob", "bob", "alice"]  # type: ignore[index]
    assert room[3]["reason"] == "left" and room[4]["reason"] == "left"
    assert len({e["epoch"] for e in room}) == 1
    await receiver.wait_for(lambda: len(receiver.of_stream("user:bob:")) >= 1)
    assert receiver.of_stream("user:alice:")[0]["type"] == "user.online"
    await bob.close()
    await receiver.wait_for(lambda: len(receiver.of_stream("user:bob:")) == 2)
    bob_events = receiver.of_stream("user:bob:")
    assert kinds(bob_events) == ["user.online", "user.offline"]
    assert bob_events[0]["version"] < bob_events[1]["version"]  # type: ignore[operator]
    assert receiver.bad == [] and receiver.duplicates_differ() == []


async def test_receiver_down_then_back_gets_everything_in_order(
    dev_factory: DevFactory, receiver: Receiver
) -> None:
    # Retries scaled down (base 0.05 s, cap 0.4 s) so a 2 s outage spans several of them.
    dev = await dev_factory(
        webhook_urls=[receiver.url],
        webhook_secret=SECRET,
        webhook_retry_base=0.05,
        webhook_retry_max=0.4,
        webhook_max_attempts=1000,
    )
    await receiver.stop()  # down: connections refused
    clients = [await raw_client(url_of(dev), f"u{i}") for i in range(6)]
    for i in range(0, 6, 2):
        room = f"down{i}"
        await clients[i].request({"type": "join", "id": 1, "room": room})
        await clients[i + 1].request({"type": "join", "id": 1, "room": room})
        await clients[i].recv_type("peer-joined")
        await clients[i + 1].request({"type": "leave", "id": 2, "room": room})
        await clients[i].request({"type": "leave", "id": 2, "room": room})
    import asyncio

    await asyncio.sleep(2.0)
    assert receiver.events == []
    await receiver.start()  # back on the same port
    await receiver.wait_for(
        lambda: all(len(receiver.of_stream(f"room:down{i}:")) == 6 for i in range(0, 6, 2)),
        timeout=10,
    )
    for i in range(0, 6, 2):
        assert kinds(receiver.of_stream(f"room:down{i}:")) == [
            "room.started", "peer.joined", "peer.joined", "peer.left", "peer.left", "room.ended",
        ]  # fmt: skip
    assert receiver.bad == []
