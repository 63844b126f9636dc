"""Every message type and error of the protocol, frame by frame, across two edges.

Clients sit on different edges of a real cluster (2 edges, 2 brokers, presence), so each
exchange crosses ZeroMQ: edge -> broker owning the room -> the target's edge.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from typing import Any

import pytest
import websockets

from signalpost.placement import owner
from tests.cluster.conftest import ClusterFactory
from tests.helpers import RawClient, raw_client, token, unversioned

pytestmark = pytest.mark.cluster

STUN = "stun:stun.example.test:3478"


async def hello_refused(url: str, hello: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps(hello))
        error = json.loads(await asyncio.wait_for(ws.recv(), 5))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        return error, ws.close_code


async def test_every_message_type_across_edges(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory(
        edges=2, brokers=2, SIGNALPOST_ROOM_CAPACITY="3", SIGNALPOST_STUN_URLS=STUN
    )
    edge1, edge2 = cluster.edge_urls
    alice = await raw_client(edge1, "alice")
    bob = await raw_client(edge2, "bob")
    assert alice.welcome["resumed"] is False and alice.welcome["user"] == "alice"
    assert alice.welcome["ice_servers"] == [{"urls": [STUN]}]
    assert alice.welcome["heartbeat"] > 0 and alice.welcome["resume"]

    # ping / ice-servers echo string and integer ids.
    assert await alice.request({"type": "ping", "id": "p-1"}) == {"type": "pong", "id": "p-1"}
    assert await bob.request({"type": "ice-servers", "id": 7}) == {
        "type": "ice-servers",
        "id": 7,
        "ice_servers": [{"urls": [STUN]}],
    }

    # Presence watch across edges, then join/peer-joined with offsets.
    watching = await alice.request({"type": "watch", "id": 1, "users": ["bob", "carol"]})
    assert unversioned(watching) == {
        "type": "watching",
        "id": 1,
        "presence": {"bob": "online", "carol": "offline"},
    }
    joined_a = await alice.request({"type": "join", "id": 2, "room": "r1", "meta": {"n": 1}})
    assert joined_a["type"] == "joined" and joined_a["members"] == []
    joined_b = await bob.request({"type": "join", "id": 3, "room": "r1"})
    assert joined_b["epoch"] == joined_a["epoch"] and joined_b["offset"] > joined_a["offset"]
    assert joined_b["members"] == [{"session": alice.session, "user": "alice", "meta": {"n": 1}}]
    peer_joined = await alice.recv_type("peer-joined")
    assert peer_joined == {
        "type": "peer-joined",
        "room": "r1",
        "peer": {"session": bob.session, "user": "bob", "meta": {}},
        "offset": joined_b["offset"],
    }
    again = await bob.request({"type": "join", "id": 4, "room": "r1"})  # no-op success
    assert again["type"] == "joined" and again["id"] == 4

    # signal with `to`: `from` comes from the server, a forged one is ignored. Its ack is
    # also the marker that bob's second join told alice nothing: r1's owner sends it down
    # the link a second peer-joined would have taken, after it.
    await alice.send(
        {
            "type": "signal",
            "id": 5,
            "room": "r1",
            "to": bob.session,
            "from": {"session": "forged", "user": "mallory"},
            "data": {"sdp": "v=0"},
        }
    )
    await alice.until_markers({"type": "ack", "id": 5})
    offer = await bob.recv_type("signal")
    assert offer["from"] == {"session": alice.session, "user": "alice"}
    assert offer["data"] == {"sdp": "v=0"} and offer["room"] == "r1"
    assert offer["offset"] > peer_joined["offset"]

    # A third member (carol, edge 2): presence change, broadcast without `to`.
    carol = await raw_client(edge2, "carol")
    assert unversioned(await alice.recv()) == {
        "type": "presence",
        "user": "carol",
        "status": "online",
    }
    await carol.request({"type": "join", "id": 1, "room": "r1"})
    await alice.recv_type("peer-joined")
    await bob.recv_type("peer-joined")
    await carol.send({"type": "signal", "id": 2, "room": "r1", "data": {"to": "all"}})
    assert await carol.recv() == {"type": "ack", "id": 2}
    for member in (alice, bob):
        got = await member.recv_type("signal")
        assert got["from"] == {"session": carol.session, "user": "carol"}
        assert got["data"] == {"to": "all"}
    # The sender does not get its own broadcast. The marker: a signal to carol alone,
    # which r1's owner sends her after the broadcast.
    marker = {"type": "signal", "id": 6, "room": "r1", "to": carol.session, "data": {}}
    assert await alice.request(marker) == {"type": "ack", "id": 6}
    await carol.until_markers({"type": "signal", "room": "r1", "data": {}})

    # Errors, each echoing the id, each leaving the connection usable.
    dave = await raw_client(edge1, "dave")
    await dave.request({"type": "join", "id": 0, "room": "r2"})
    errors = {
        "room_full": await dave.request({"type": "join", "id": "a", "room": "r1"}),
        "not_in_room": await dave.request(
            {"type": "signal", "id": "b", "room": "r1", "to": alice.session, "data": {}}
        ),
        # A session of another room is not a peer here.
        "unknown_peer": await alice.request(
            {"type": "signal", "id": "c", "room": "r1", "to": dave.session, "data": {}}
        ),
        "bad_request": await dave.request({"type": "signal", "id": "d", "room": "r2"}),
    }
    for code, error in errors.items():
        assert error["type"] == "error" and error["code"] == code, error
        assert error["message"]
    assert [e["id"] for e in errors.values()] == ["a", "b", "c", "d"]
    assert await dave.request({"type": "ping", "id": 9}) == {"type": "pong", "id": 9}

    # Token does not grant the room: forbidden.
    limited = RawClient(await websockets.connect(edge2))
    await limited.send({"type": "hello", "token": token("erin", rooms=["team-*"])})
    await limited.recv_type("welcome")
    assert (await limited.request({"type": "join", "id": 1, "room": "team-a"}))["type"] == "joined"
    forbidden = await limited.request({"type": "join", "id": 2, "room": "r2"})
    assert (forbidden["code"], forbidden["id"]) == ("forbidden", 2)

    # Unwatch: no more presence frames for that user.
    assert await alice.request({"type": "unwatch", "id": 8, "users": ["carol"]}) == {
        "type": "unwatched",
        "id": 8,
    }

    # leave -> left; the others see peer-left "left".
    assert await bob.request({"type": "leave", "id": 10, "room": "r1"}) == {
        "type": "left",
        "id": 10,
        "room": "r1",
    }
    for member in (alice, carol):
        left = await member.recv_type("peer-left")
        assert left["peer"]["session"] == bob.session and left["reason"] == "left"

    # Clean close (1000): peer-left "disconnected" at once; carol is unwatched: no presence.
    await carol.ws.close(1000)
    left = await alice.recv_type("peer-left")
    assert left["peer"]["session"] == carol.session and left["reason"] == "disconnected"

    # Nothing else came: not carol's "offline" to alice, and nothing of r1 to dave (room r2)
    # or erin. A marker down each path such a frame would take, sent after it:
    # - presence -> alice: frank, whom alice now watches, comes online on carol's edge
    #   (that edge told presence of carol's close before it let frank in);
    # - r1's owner -> edge 1 (alice, dave): dave joins r1, alice hears of it;
    # - r1's owner -> edge 2 (erin): erin joins a room of her own that r1's owner owns.
    watching = await alice.request({"type": "watch", "id": 11, "users": ["frank"]})
    assert watching["presence"] == {"frank": "offline"}
    await raw_client(edge2, "frank")
    await dave.send({"type": "join", "id": 11, "room": "r1"})
    await dave.until_markers({"type": "joined", "id": 11, "room": "r1"})
    await alice.until_markers(
        {"type": "presence", "user": "frank", "status": "online"},
        {
            "type": "peer-joined",
            "room": "r1",
            "peer": {"session": dave.session, "user": "dave", "meta": {}},
        },
    )
    brokers = sorted(p["url"] for p in cluster.of_kind("broker"))
    erins = next(
        room
        for room in (f"team-{n}" for n in itertools.count())
        if owner(room, brokers) == owner("r1", brokers)
    )
    await limited.send({"type": "join", "id": 3, "room": erins})
    await limited.until_markers({"type": "joined", "id": 3, "room": erins})


async def test_a_dropped_session_times_out_with_peer_left_timeout(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(edges=2, brokers=1, SIGNALPOST_RESUME_WINDOW="1")
    edge1, edge2 = cluster.edge_urls
    alice = await raw_client(edge1, "alice")
    bob = await raw_client(edge2, "bob")
    await alice.request({"type": "join", "id": 1, "room": "r"})
    await bob.request({"type": "join", "id": 1, "room": "r"})
    await alice.recv_type("peer-joined")
    await alice.request({"type": "watch", "id": 2, "users": ["bob"]})
    assert bob.ws.transport is not None
    bob.ws.transport.abort()  # no close frame: the session is suspended, not ended
    # The broker (peer-left) and the presence service (offline) time the session out
    # independently: either frame may come first.
    frames = {frame["type"]: frame for frame in [await alice.recv(10), await alice.recv(10)]}
    left = frames["peer-left"]
    assert left["peer"]["session"] == bob.session and left["reason"] == "timeout"
    assert unversioned(frames["presence"]) == {
        "type": "presence",
        "user": "bob",
        "status": "offline",
    }


BAD_HELLOS = {
    "expired": {"type": "hello", "token": token("alice", ttl=-3600)},
    "garbage": {"type": "hello", "token": "not-a-jwt"},
    "missing": {"type": "hello"},
    "alg-none": {
        "type": "hello",
        "token": ".".join(
            base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
            for part in ({"alg": "none", "typ": "JWT"}, {"sub": "alice", "exp": 2**33})
        )
        + ".",
    },
}


async def test_bad_tokens_get_unauthorized_and_4401_on_any_edge(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(edges=2, brokers=1)
    for url in cluster.edge_urls:
        for name, hello in BAD_HELLOS.items():
            error, code = await hello_refused(url, hello)
            assert error["type"] == "error" and error["code"] == "unauthorized", name
            assert code == 4401, name
    assert all(cluster.alive(p["id"]) for p in cluster.processes)
