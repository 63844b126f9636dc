"""The edge's placement of rooms on brokers (``ZmqBackplane``), over real DEALER sockets.

Room names come from clients, so the owner memo must stay bounded however many names are
tried. (A room's former owner is no longer told to step down by the edges: it hands the
room over when the new owner asks, broker/rooms.py.)
"""

from __future__ import annotations

import pytest

from edge import zmq_backplane
from edge.zmq_backplane import ZmqBackplane
from signalpost.config import Settings
from signalpost.placement import owner
from signalpost.wire import EdgeSync

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
