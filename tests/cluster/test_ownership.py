"""Ownership changes lose nothing: a paused owner that wakes up, and a rolling restart.

3. The owner of a room is paused (SIGSTOP) longer than the heartbeat expiry while a
   receiver is away; its runner-up takes the room over and acks signals; the old owner
   wakes up (SIGCONT). Terms fence it: it gets nothing acked or delivered, takes the room
   back only by handoff, and the receiver's resume replays every signal once, in order,
   with ``recovered: true``.
5. Every broker is restarted in turn (SIGTERM: it hands its rooms over before it exits;
   restarted, it takes them back by handoff) while signals flow and a receiver is away:
   the resume still replays everything, ``recovered: true``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
import websockets

from signalpost.client import PeerJoined, SignalpostClient
from tests.cluster.conftest import ClusterFactory
from tests.helpers import RawClient, token

pytestmark = pytest.mark.cluster

ENV = {
    "SIGNALPOST_RATE_PER_SECOND": "100000",
    "SIGNALPOST_RATE_BURST": "100000",
    "SIGNALPOST_ROOM_CAPACITY": "8",
}


async def _away(
    url: str, room: str
) -> tuple[SignalpostClient, str, dict[str, dict[str, Any]], str]:
    """Bob joins ``room`` and drops his connection: (client, session, positions, resume)."""
    bob = SignalpostClient(url, token("bob"), auto_resume=False, request_timeout=15)
    await bob.connect()
    await bob.join(room)
    assert bob.session is not None and bob.resume_token is not None
    return bob, bob.session, {}, bob.resume_token


async def _resume_and_read(
    url: str, resume: str, positions: dict[str, dict[str, Any]], count: int, room: str
) -> tuple[list[int], dict[str, Any]]:
    raw = RawClient(await websockets.connect(url))
    await raw.send({"type": "hello", "token": token("bob"), "resume": resume, "rooms": positions})
    assert (await raw.recv_type("welcome"))["resumed"] is True
    got: list[int] = []
    while True:
        frame = await raw.recv(timeout=20)
        if frame["type"] == "recovered" and frame["room"] == room:
            return got, frame
        if frame["type"] == "signal":
            got.append(frame["data"]["n"])


# "on": ownership from the view in Consul's KV (the paused broker's check fails, a new view
# leaves it out); "off": from heartbeats alone.
@pytest.mark.parametrize("consul", ["on", "off"])
async def test_a_paused_owner_that_wakes_up_does_no_harm(
    cluster_factory: ClusterFactory, consul: str
) -> None:
    cluster = cluster_factory(edges=2, brokers=2, consul=consul, **ENV)
    edge1, edge2 = cluster.edge_urls
    room = "paused-room"
    doomed = cluster.owner_of(room)
    async with SignalpostClient(edge1, token("alice"), request_timeout=20) as alice:
        await alice.join(room)
        bob, bob_session, _, resume = await _away(edge2, room)
        await alice.next_event(PeerJoined)
        position = bob.positions[room]
        positions = {room: {"epoch": position.epoch, "offset": position.offset}}
        assert bob._ws is not None and bob._ws.transport is not None
        bob._ws.transport.abort()  # bob is away from here on
        for n in range(10):
            await alice.signal(room, {"n": n}, to=bob_session)
        os.kill(cluster.pid(doomed), signal.SIGSTOP)  # longer than the 1 s expiry
        try:
            for n in range(10, 15):
                await alice.signal(room, {"n": n}, to=bob_session)  # acked by the runner-up
            await asyncio.sleep(1.5)
        finally:
            os.kill(cluster.pid(doomed), signal.SIGCONT)
        await asyncio.sleep(2.0)  # it wakes up, is seen alive again, gets the room back
        for n in range(15, 20):
            await alice.signal(room, {"n": n}, to=bob_session)
        got, recovered = await _resume_and_read(edge1, resume, positions, 20, room)
        assert got == list(range(20)), got
        assert recovered["recovered"] is True
        await bob.close()


@pytest.mark.parametrize("consul", ["on", "off"])
async def test_a_rolling_restart_keeps_every_resume_recovered(
    cluster_factory: ClusterFactory, consul: str
) -> None:
    cluster = cluster_factory(edges=2, brokers=3, restart=True, consul=consul, **ENV)
    edge1, edge2 = cluster.edge_urls
    rooms = [f"rolling-{n}" for n in range(6)]
    async with SignalpostClient(edge1, token("alice"), request_timeout=20) as alice:
        for room in rooms:
            await alice.join(room)
        bob = SignalpostClient(edge2, token("bob"), auto_resume=False, request_timeout=15)
        await bob.connect()
        for room in rooms:
            await bob.join(room)
        assert bob.session is not None and bob.resume_token is not None
        positions = {
            room: {"epoch": p.epoch, "offset": p.offset} for room, p in bob.positions.items()
        }
        assert bob._ws is not None and bob._ws.transport is not None
        bob._ws.transport.abort()
        sent = 0

        async def some_signals(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                await alice.signal(rooms[sent % len(rooms)], {"n": sent}, to=bob.session)
                sent += 1

        await some_signals(12)
        for process in list(cluster.of_kind("broker")):
            old_pid = process["pid"]
            cluster.kill(process["id"], signal.SIGTERM)
            await some_signals(12)  # while it hands over, exits and is restarted
            deadline = time.monotonic() + 20
            while True:
                cluster.reload()
                if cluster.pid(process["id"]) != old_pid and cluster.alive(process["id"]):
                    break
                assert time.monotonic() < deadline, f"{process['id']} was not restarted"
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.5)  # seen again, it takes its rooms back by handoff
            await some_signals(12)
        raw = RawClient(await websockets.connect(edge1))
        await raw.send(
            {"type": "hello", "token": token("bob"), "resume": bob.resume_token, "rooms": positions}
        )
        assert (await raw.recv_type("welcome"))["resumed"] is True
        got: list[int] = []
        reports: dict[str, bool] = {}
        while len(reports) < len(rooms):
            frame = await raw.recv(timeout=20)
            if frame["type"] == "recovered":
                reports[frame["room"]] = frame["recovered"]
            elif frame["type"] == "signal":
                got.append(frame["data"]["n"])
        assert reports == {room: True for room in rooms}
        assert sorted(got) == list(range(sent)), sorted(set(range(sent)) - set(got))
        for room in rooms:  # in order within each room
            mine = [n for n in got if n % len(rooms) == rooms.index(room)]
            assert mine == sorted(mine)
        await bob.close()
