"""Authority between tiers (issue 14): a node acts only on what its sender may speak for.

A running cluster (CurveZMQ keys), two admitted nodes that are not what they claim: an
edge's key and a broker's key, each added to the cluster keys directory the way an
operator adds a node, each sending under its own name (so the sender checks pass). Every
forged envelope is refused and logged by the broker or presence node it reaches, and the
sessions it names see nothing: alice and bob are still in their room on their own edges,
and their next signals are each other's markers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import zmq

from signalpost.client import PeerJoined, SignalEvent, SignalpostClient
from signalpost.node_keys import create_node_keys, read_trusted
from signalpost.transport import frame
from signalpost.wire import (
    AttachCmd,
    ClaimCmd,
    Envelope,
    Handoff,
    HandoffRequest,
    Heartbeat,
    JoinCmd,
    LeaseCopy,
    LeaveCmd,
    ReplicateCmd,
    RestoreCmd,
    SignalCmd,
    StatusSubscribe,
    WatchCmd,
    encode_envelope,
    peer_object,
    sender_object,
)
from tests.cluster.conftest import ClusterFactory
from tests.helpers import curve_dealer, token

pytestmark = pytest.mark.cluster

FORGED = b'{"kind":"offer","forged":true}'


async def test_forged_envelopes_from_admitted_nodes_of_the_wrong_kind_or_edge_are_refused(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(edges=2, brokers=1, presence=1)
    edge1, edge2 = cluster.edge_urls
    (broker,) = cluster.of_kind("broker")
    (presence,) = cluster.of_kind("presence")
    servers = read_trusted(cluster.keys_dir).servers
    _, edge_secret = create_node_keys(cluster.keys_dir, "rogue-edge", kind="edge")
    _, broker_secret = create_node_keys(cluster.keys_dir, "rogue-broker", kind="broker")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    def send(target: dict[str, Any], secret: Path, name: str, envelopes: list[Envelope]) -> None:
        url = target["url"]
        sock = curve_dealer(context, url, name.encode(), secret, servers[url])
        sock.send(frame([encode_envelope(e) for e in envelopes]))
        sockets.append(sock)

    sockets: list[zmq.Socket[bytes]] = []
    try:
        async with (
            SignalpostClient(edge1, token("alice")) as alice,
            SignalpostClient(edge2, token("bob")) as bob,
        ):
            await alice.join("call")
            await bob.join("call")
            await bob.watch(["alice"])
            await alice.next_event(PeerJoined)  # bob's: alice has nothing else to see

            def signal(edge: str) -> SignalCmd:  # alice's, to bob, sent by ``edge``
                sender = sender_object(alice.session, "alice")
                return SignalCmd(
                    alice.session, "c.9", edge, 1, None, "call", bob.session, sender, FORGED
                )

            # The right kind (an edge) naming a session another edge holds: refused by the
            # broker (signal, leave; moving alice's seats to itself with a newer connection
            # but no ticket of presence's, or a made-up one) and presence (watch).
            # Broker-to-broker envelopes from an edge's key: refused for its kind (a
            # handoff would replace the room).
            peer = peer_object(alice.session, "alice", None, None)
            made_up = bytes(16)
            send(
                broker,
                edge_secret,
                "rogue-edge",
                [
                    # Heard first (a broker takes requests only from a node that
                    # heartbeated, naming its run or none): then each forgery is judged.
                    Heartbeat("rogue-edge", "r"),
                    AttachCmd(alice.session, "x.99", "rogue-edge", {}),
                    AttachCmd(alice.session, "x.99", "rogue-edge", {}, made_up),
                    RestoreCmd(alice.session, "x.99", "rogue-edge", "call", peer, False),
                    JoinCmd(alice.session, "x.99", "rogue-edge", 1, None, "call2", peer),
                    signal("rogue-edge"),
                    LeaveCmd(alice.session, "c.9", "rogue-edge", 2, None, "call"),
                    ReplicateCmd("rogue-edge", "call", "e", 1, [], term=2**62),
                    HandoffRequest("call", "rogue-edge", term=2**62),
                    Handoff("call", "rogue-edge", True, term=2**62, epoch="forged"),
                ],
            )
            # A broker's key sending an edge's commands under its own name: its kind.
            send(broker, broker_secret, "rogue-broker", [signal("rogue-broker")])
            send(
                presence,
                broker_secret,
                "rogue-broker",
                [ClaimCmd(alice.session, "alice", "rogue-broker", "x.99")],
            )
            send(
                presence,
                edge_secret,
                "rogue-edge",
                [
                    WatchCmd(alice.session, "c.9", "rogue-edge", 1, None, ["bob"]),
                    LeaseCopy("rogue-edge", alice.session, "alice", "rogue-edge", "x.99"),
                    StatusSubscribe("rogue-edge", ["alice"]),
                ],
            )
            # Each one logged (once per node, reason and envelope type per 5 s).
            expected = {
                broker["id"]: [
                    "rogue-edge (session): AttachCmd would move",
                    "rogue-edge (session): RestoreCmd would move",
                    "rogue-edge (session): JoinCmd would move",
                    "rogue-edge (session): SignalCmd for session",
                    "rogue-edge (session): LeaveCmd for session",
                    "rogue-edge (kind): ReplicateCmd from a node of kind 'edge'",
                    "rogue-edge (kind): HandoffRequest from a node of kind 'edge'",
                    "rogue-edge (kind): Handoff from a node of kind 'edge'",
                    "rogue-broker (kind): SignalCmd from a node of kind 'broker'",
                ],
                presence["id"]: [
                    "rogue-edge (session): WatchCmd for session",
                    "rogue-edge (kind): LeaseCopy from a node of kind 'edge'",
                    "rogue-edge (kind): StatusSubscribe from a node of kind 'edge'",
                    "rogue-broker (kind): ClaimCmd from a node of kind 'broker'",
                ],
            }
            async with asyncio.timeout(15):  # every forgery refused, and logged
                while not all(  # noqa: ASYNC110 - log files
                    f"refused frames from node {who}" in cluster.log(node)
                    for node, whos in expected.items()
                    for who in whos
                ):
                    await asyncio.sleep(0.05)
            # Nothing forged reached anyone: both are still members on their own edges
            # (a forged leave, claim or handoff would have broken one of these), and each
            # one's next event is the other's marker.
            await alice.signal("call", {"kind": "marker"}, to=bob.session)
            event = await bob.next_event(SignalEvent, timeout=10)
            assert event.data == {"kind": "marker"}
            await bob.signal("call", {"kind": "marker"}, to=alice.session)
            event = await alice.next_event(timeout=10)
            assert isinstance(event, SignalEvent) and event.data == {"kind": "marker"}
            joined = await bob.join("call2")  # the forged join did not seat alice there
            assert joined["members"] == []
    finally:
        for sock in sockets:
            sock.close()
        context.destroy(linger=0)
