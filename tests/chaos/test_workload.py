"""The chaos clients against one in-process dev edge: where nothing breaks, nothing is reported.

A dev edge applies every command in order in one process, so the only way to lose or double
a signal would be a mistake of the harness: these runs must judge clean, including clients
that drop (abort or half open) and resume while the others keep sending to them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from edge.backplane import LocalBackplane
from edge.server import EdgeServer
from signalpost.config import load_settings
from tests.chaos.checker import Journal, check, undelivered
from tests.chaos.workload import ChaosClient, Endpoint
from tests.helpers import SECRET

ROOMS = {"alice": ("r1", "r2"), "bob": ("r1",), "carol": ("r1", "r2"), "dave": ("r2",)}


@asynccontextmanager
async def dev_edge() -> AsyncIterator[EdgeServer]:
    """A dev-mode edge (rooms and presence in process) on a free port."""
    settings = load_settings(
        environ={}, jwt_secret=SECRET, host="127.0.0.1", port=0, room_capacity=8
    )
    async with EdgeServer(settings, LocalBackplane(settings), edge_id="dev") as server:
        yield server


async def start_clients(server: EdgeServer, journal: Journal) -> list[ChaosClient]:
    url = f"ws://127.0.0.1:{server.port}/v1/signal"
    edges = [Endpoint("dev-a", url), Endpoint("dev-b", url)]  # two names, one edge
    clients = [
        ChaosClient(name, rooms, edges, index % 2, journal, time.monotonic)
        for index, (name, rooms) in enumerate(ROOMS.items())
    ]
    await asyncio.gather(*(c.connect() for c in clients))
    await asyncio.gather(*(c.join_rooms() for c in clients))
    return clients


def peers_of(clients: list[ChaosClient], client: ChaosClient, room: str) -> list[ChaosClient]:
    return [c for c in clients if c is not client and room in c.rooms]


async def traffic(clients: list[ChaosClient], seconds: float, rng: random.Random) -> None:
    """Every client sends to every room of its for ``seconds``; returns when all are answered."""
    stop = asyncio.Event()
    senders = [
        asyncio.create_task(
            client.run_room(
                room,
                peers_of(clients, client, room),
                stop,
                random.Random(rng.getrandbits(32)),
                interval=(0.01, 0.05),
                depth=2,
            )
        )
        for client in clients
        for room in client.rooms
    ]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*senders)


async def markers_in(clients: list[ChaosClient], journal: Journal) -> None:
    await asyncio.gather(
        *(
            c.send_signal(room, None, peers_of(clients, c, room), marker=True)
            for c in clients
            for room in c.rooms
        )
    )
    async with asyncio.timeout(5):
        while undelivered(journal):  # noqa: ASYNC110 - a condition over every client's journal
            await asyncio.sleep(0.05)


async def test_a_quiet_run_judges_clean() -> None:
    journal = Journal(time.monotonic())
    async with dev_edge() as server:
        clients = await start_clients(server, journal)
        try:
            await traffic(clients, 1.0, random.Random(1))
            await markers_in(clients, journal)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
    verdict = check(journal)
    assert verdict.violations == []
    acked = sum(s.acked_at is not None for s in journal.signals)
    assert acked > 50
    assert verdict.deliveries_checked >= acked


async def test_drops_and_resumes_judge_clean() -> None:
    journal = Journal(time.monotonic())
    rng = random.Random(2)
    async with dev_edge() as server:
        clients = await start_clients(server, journal)
        alice, bob = clients[0], clients[1]
        try:
            await traffic(clients, 0.5, rng)
            # Nothing is pending now: a resent request could only be a (known) duplicate.
            assert await alice.drop(half_open=True)
            assert await bob.drop(half_open=False)
            await traffic(clients, 0.5, rng)  # the others send to them while they resume
            assert await alice.wait_ready(5) and await bob.wait_ready(5)
            await traffic(clients, 0.5, rng)
            await markers_in(clients, journal)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
    assert check(journal).violations == []
    for name in ("alice", "bob"):
        mine = sorted((c for c in journal.connections if c.client == name), key=lambda c: c.number)
        assert [(c.number, c.resumed) for c in mine] == [(1, False), (2, True)]
    old_alice = next(c for c in journal.connections if c.client == "alice" and c.number == 1)
    assert old_alice.close_code == 4409  # the half-open connection was replaced
    assert any(r.client == "bob" and r.recovered for r in journal.recoveries)
    assert any(r.target == "alice" and r.conn == 2 and r.counted for r in journal.receptions)
