"""The edge's placement of rooms on brokers (``ZmqBackplane``), over real DEALER sockets.

Room names come from clients, so the owner memo must stay bounded however many names are
tried. (A room's former owner is no longer told to step down by the edges: it hands the
room over when the new owner asks, broker/rooms.py.)
"""

from __future__ import annotations

import asyncio

import pytest
import zmq

from edge import zmq_backplane
from edge.zmq_backplane import ZmqBackplane
from signalpost.config import Settings
from signalpost.placement import owner
from signalpost.transport import RouterEndpoint
from signalpost.wire import EdgeSync, Envelope, SessionUp

# Nothing listens there: the links are never started, only placed on.
A, B, C = (f"tcp://127.0.0.1:{port}" for port in (9, 13, 17))
ROOMS = [f"room-{i}" for i in range(300)]


def backplane(on_change: list[dict[str, tuple[str, str | None]]]) -> ZmqBackplane:
    plane = ZmqBackplane(Settings(insecure_node_links=True))

    def owners_changed() -> None:
        on_change.append({room: (plane.owner_of(room).endpoint, None) for room in ROOMS})

    plane.connect(
        "edge-test", lambda envelope: None, lambda: EdgeSync("edge-test", []), owners_changed
    )
    return plane


async def test_the_owner_memo_is_bounded_and_stays_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zmq_backplane, "MAX_CACHED_OWNERS", 50)
    plane = backplane([])
    try:
        plane.update_brokers({A: A, B: B, C: C})
        for room in ROOMS:
            assert plane.owner_of(room).endpoint == owner(room, sorted([A, B, C]))
            assert len(plane._owners) <= 50
        for room in ROOMS[:10]:  # answered again after the memo started over
            assert plane.owner_of(room).endpoint == owner(room, sorted([A, B, C]))
    finally:
        await plane.close()


async def test_presence_commands_wait_for_a_presence_node_to_be_known() -> None:
    """A just-started edge may welcome a session resumed on its token before it knows any
    presence node: its announcement (whose answer carries the session's seat ticket) is
    held until one is known, not dropped."""
    got: list[tuple[str, Envelope]] = []
    arrived = asyncio.Event()

    def receive(peer: str, envelope: Envelope) -> None:
        got.append((peer, envelope))
        arrived.set()

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    presence = RouterEndpoint(
        context,
        "tcp://127.0.0.1:*",
        "presence-1",
        on_envelope=receive,
        on_peer_lost=lambda peer: None,
        on_peer_restarted=lambda peer: None,
        heartbeat_interval=0.2,
        peer_expiry=5.0,
        keys=None,
        max_message=1 << 20,
    )
    plane = ZmqBackplane(Settings(insecure_node_links=True, heartbeat_interval=0.2))
    plane.connect("edge-test", lambda envelope: None, lambda: EdgeSync("edge-test", [], {}), list)
    try:
        async with presence:
            await plane.start()
            up = SessionUp("s-1", "alice", "edge-test", "c.2")
            plane.to_presence("alice", up)  # no presence node known yet
            plane.update_presence([presence.endpoint])
            async with asyncio.timeout(5):
                while not any(envelope == up for _peer, envelope in got):
                    arrived.clear()
                    await arrived.wait()
    finally:
        await plane.close()
        context.term()
