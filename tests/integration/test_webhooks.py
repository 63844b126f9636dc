"""Webhooks from dev mode (``signalpost dev``: one process) to a real HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

from signalpost.cli import run_dev
from signalpost.config import load_settings
from tests.helpers import SECRET as HELPER_SECRET
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


#: How long the receiver is down. The issue says a minute: run with
#: SIGNALPOST_TEST_WEBHOOK_DOWN=60 for that; by default 2 s, with the retry delays scaled
#: down (0.05 s doubling to 0.4 s) so the outage spans several retries of each event.
DOWN_FOR = float(os.environ.get("SIGNALPOST_TEST_WEBHOOK_DOWN", "2"))


@pytest.mark.timeout(DOWN_FOR + 60)
async def test_receiver_down_then_back_gets_everything_in_order(
    dev_factory: DevFactory, receiver: Receiver
) -> None:
    dev = await dev_factory(
        webhook_urls=[receiver.url],
        webhook_secret=SECRET,
        webhook_retry_base=0.05,
        webhook_retry_max=0.4,
        webhook_max_attempts=int(DOWN_FOR / 0.2) + 100,  # never dead-lettered here
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
    await asyncio.sleep(DOWN_FOR)
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


async def test_signalpost_dev_shows_its_webhooks_at_dev_webhooks() -> None:
    # ``signalpost dev`` without webhook_urls hands them to its own receiver (signatures
    # checked) and serves them for the demo app's panel, while the panel asks for them:
    # what happened before it first asked makes no events.
    settings = load_settings(
        environ={}, host="127.0.0.1", port=0, dev_tokens=True, jwt_secret=HELPER_SECRET
    )
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_dev(settings, ready=port.set_result))
    try:
        edge_port = await asyncio.wait_for(port, 10)
        url = f"ws://127.0.0.1:{edge_port}/v1/signal"

        def fetch() -> dict[str, Any]:
            address = f"http://127.0.0.1:{edge_port}/v1/dev-webhooks?after=0"
            with urllib.request.urlopen(address) as response:
                body: dict[str, Any] = json.loads(response.read())
                return body

        ada = await raw_client(url, "ada")
        await ada.request({"type": "join", "id": 1, "room": "unwatched"})
        assert (await asyncio.to_thread(fetch))["events"] == []  # the panel opens here
        bob = await raw_client(url, "bob")
        await bob.request({"type": "join", "id": 1, "room": "demo"})
        events: list[dict[str, Any]] = []
        for _ in range(50):
            body = await asyncio.to_thread(fetch)
            events = [e["event"] for e in body["events"]]
            if any(e["type"] == "peer.joined" for e in events):
                break
            await asyncio.sleep(0.1)
        assert {(e["type"], e.get("room"), e.get("user")) for e in events} == {
            ("user.online", None, "bob"),
            ("room.started", "demo", None),
            ("peer.joined", "demo", None),
        }
        assert body["refused"] == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
