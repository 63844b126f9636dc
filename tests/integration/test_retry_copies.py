"""An edge writes each room event once and in order, however its copies arrive.

Owners resend what an edge has not confirmed, replay after a sync, and two rooms of one
client can have different owners whose deliveries interleave in any order. The edge
keeps, per (session, room), the offset it has written: a delivery at or below it is a
copy, one whose ``prev`` is above it has something missing before it (both dropped; the
owner resends). Rooms are independent: a high offset in one room says nothing about
another (defect 1 of the delivery issue: dedup by "highest seen per sender" lost signals
of a client in two rooms on two brokers).
"""

from __future__ import annotations

import pytest

from edge.server import EdgeServer
from signalpost.wire import Deliver
from tests.helpers import RawClient, raw_client, url_of


def signal(room: str, offset: int) -> bytes:
    return b'{"type":"signal","room":"%s","data":{"n":%d},"offset":%d}' % (
        room.encode(),
        offset,
        offset,
    )


async def base_offsets(client: RawClient, rooms: list[str]) -> dict[str, int]:
    offsets = {}
    for n, room in enumerate(rooms):
        joined = await client.request({"type": "join", "id": f"j{n}", "room": room})
        assert joined["type"] == "joined", joined
        offsets[room] = joined["offset"]
    return offsets


@pytest.mark.parametrize("with_bystander", [False, True], ids=["one-peer", "two-peers"])
async def test_copies_and_gaps_are_dropped_per_room(dev: EdgeServer, with_bystander: bool) -> None:
    url = url_of(dev)
    bob = await raw_client(url, "bob")
    carol = await raw_client(url, "carol")
    clients = [bob, carol] if with_bystander else [bob]
    # Each client gets its own rooms, so the injected offsets are theirs alone.
    bases = [await base_offsets(c, [f"a-{c.session}", f"b-{c.session}"]) for c in clients]
    for client, base in zip(clients, bases, strict=True):
        room_a, room_b = list(base)
        a, b = base[room_a], base[room_b]
        steps = [
            (room_a, a + 1, a),
            (room_a, a + 1, a),  # a copy
            (room_b, b + 1, b),  # the other room's offsets are its own
            (room_a, a + 2, a + 1),
            (room_b, b + 1, b),  # a copy
            (room_a, a + 4, a + 3),  # a + 3 is missing: dropped, not written out of order
            (room_a, a + 3, a + 2),  # the resend, in order
            (room_a, a + 4, a + 3),
            (room_a, a + 2, a + 1),  # a late copy
            (room_b, b + 2, b + 1),  # the marker: everything before it has been handled
        ]
        for room, offset, prev in steps:
            dev.receive(Deliver([client.session], signal(room, offset), room, offset, prev))
    for client, base in zip(clients, bases, strict=True):
        room_a, room_b = list(base)
        a, b = base[room_a], base[room_b]
        expected = [(room_a, a + 1), (room_b, b + 1), (room_a, a + 2), (room_a, a + 3)]
        expected += [(room_a, a + 4), (room_b, b + 2)]
        got = [await client.recv() for _ in expected]
        assert [(f["room"], f["offset"]) for f in got] == expected


async def test_a_delivery_for_a_room_not_joined_here_is_not_written(dev: EdgeServer) -> None:
    bob = await raw_client(url_of(dev), "bob")
    (base,) = (await base_offsets(bob, ["joined"])).values()
    dev.receive(Deliver([bob.session], signal("elsewhere", 1), "elsewhere", 1, 0))
    dev.receive(Deliver([bob.session], signal("joined", base + 1), "joined", base + 1, base))
    frame = await bob.recv()  # the marker comes first: the other frame was dropped
    assert (frame["room"], frame["offset"]) == ("joined", base + 1)
