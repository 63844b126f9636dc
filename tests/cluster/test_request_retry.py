"""Requests in doubt across a crashed edge: resent with their ids, applied once.

The sender's edge is killed -9 while hundreds of its signals are in flight: some reached
the room's broker and were delivered, their acks lost with the edge; some may never have
left the edge. The SDK resends every unacknowledged one with its id after resuming on the
other edge; the broker applies each (session, id) at most once and answers a resend with
the reply it recorded, so every ``signal()`` ends once, as a success, and the receiver
gets each signal once, in order.

Two ways to be in doubt:

- ``kill-at-an-ack``: the edge dies as the sender reads its 20th ack; how far the edge got
  with the other 180 is up to the race (the mix a real crash leaves).
- ``acks-lost``: the sender's TCP path to the edge (a relay in this test) holds back
  everything the edge sends; once the receiver has every signal, the edge is killed and
  the path cut. All 200 were applied and none acked: every resend must be recognised.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from signalpost.client import PeerJoined, Resumed, SignalEvent, SignalpostClient
from tests.cluster.conftest import ClusterFactory
from tests.helpers import token

pytestmark = pytest.mark.cluster

FAST_CLIENTS = {"SIGNALPOST_RATE_PER_SECOND": "100000", "SIGNALPOST_RATE_BURST": "100000"}
SIGNALS = 200  # pipelined: all sent before the first ack; fewer than the 256 records kept
KILL_AT_ACK = 20


class Relay:
    """A TCP relay to one address that can hold back what comes back, and be cut."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.host, self.target_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path
        self.holding = False  # drop what the target sends: lost on the way
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}{self.path}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        target_r, target_w = await asyncio.open_connection(self.host, self.target_port)
        self._writers += [client_w, target_w]
        for pump in (self._pump(client_r, target_w, False), self._pump(target_r, client_w, True)):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, back: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if not (back and self.holding):
                    writer.write(data)
        writer.transport.abort()

    def cut(self) -> None:
        """Reset every relayed connection at once (what a dead host's peers see)."""
        for writer in self._writers:
            writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        for task in list(self._pumps):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def relay_factory() -> AsyncIterator[Any]:
    relays: list[Relay] = []

    async def start(target: str) -> Relay:
        relay = Relay(target)
        await relay.start()
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        await relay.close()


@pytest.mark.parametrize("doubt", ["kill-at-an-ack", "acks-lost"])
async def test_kill_9_the_senders_edge_every_pipelined_signal_ends_once_and_arrives_once(
    cluster_factory: ClusterFactory,
    relay_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    doubt: str,
) -> None:
    cluster = cluster_factory(edges=2, brokers=1, **FAST_CLIENTS)
    (edge1, edge1_url), (_, edge2_url) = [(p["id"], p["url"]) for p in cluster.of_kind("edge")]
    relay: Relay = await relay_factory(edge1_url)
    room = "retry-room"
    # Alice is on edge 1 (through the relay when it must lose the acks) and reconnects to
    # the next URL: edge 2, where Bob is.
    first_url = relay.url if doubt == "acks-lost" else edge1_url
    alice = SignalpostClient([first_url, edge2_url], token("alice"), request_timeout=20)
    bob = SignalpostClient(edge2_url, token("bob"), request_timeout=20)
    await alice.connect()
    await bob.connect()
    try:
        await alice.join(room)
        await bob.join(room)
        await alice.next_event(PeerJoined)
        received: list[int] = []
        all_received = asyncio.Event()

        async def receive() -> None:
            for _ in range(SIGNALS):
                received.append((await bob.next_event(SignalEvent, timeout=30)).data["n"])
            all_received.set()

        killed = asyncio.Event()
        in_doubt = 0
        if doubt == "kill-at-an-ack":
            # Killed from inside Alice's frame loop as she reads the 20th ack: whatever
            # the edge did after writing it is in doubt for her.
            acks = 0
            on_frame = alice._on_frame

            def kill_at_an_ack(frame: dict[str, Any]) -> None:
                nonlocal acks, in_doubt
                on_frame(frame)
                if frame.get("type") == "ack":
                    acks += 1
                    if acks == KILL_AT_ACK:
                        cluster.kill(edge1)
                        in_doubt = len(alice._pending)
                        killed.set()

            monkeypatch.setattr(alice, "_on_frame", kill_at_an_ack)
        else:
            relay.holding = True

        receiver = asyncio.create_task(receive())
        sends = [
            asyncio.create_task(alice.signal(room, {"n": n}, to=bob.session))
            for n in range(SIGNALS)
        ]
        if doubt == "acks-lost":
            await asyncio.wait_for(all_received.wait(), 20)  # every one applied...
            in_doubt = len(alice._pending)  # ...and none acked
            cluster.kill(edge1)
            relay.cut()
            killed.set()
        await asyncio.wait_for(killed.wait(), 20)
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 60)
        assert in_doubt == SIGNALS - (KILL_AT_ACK if doubt == "kill-at-an-ack" else 0)
        assert (await alice.next_event(Resumed, timeout=20)).resumed is True
        # Every signal() ended once, as a success (an exception would be in the list).
        assert results == [None] * SIGNALS
        # Each arrived once, in order, and nothing more is on its way (a duplicate would).
        await asyncio.wait_for(receiver, 30)
        with contextlib.suppress(TimeoutError):
            while True:
                received.append((await bob.next_event(SignalEvent, timeout=1)).data["n"])
        duplicates = len(received) - len(set(received))
        assert received == list(range(SIGNALS)), (
            f"{in_doubt} in doubt at the kill; {len(received)} received, "
            f"{duplicates} duplicates; first out of order at index "
            f"{next((i for i, n in enumerate(received) if n != i), None)}"
        )
    finally:
        await alice.close()
        await bob.close()
