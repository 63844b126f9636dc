"""The node mesh of a real cluster refuses nodes without the cluster's keys (issue 14, defect 1).

The attack as filed: a DEALER that reaches a broker's port sends a ``SignalCmd`` naming a
member's session with a forged sender. ``signalpost cluster`` runs with CurveZMQ keys, so
a plaintext DEALER never completes a handshake and one with a key pair of its own is
refused by ZAP (logged by the broker): neither hears back from the broker, while a probe
whose public key was added to the cluster keys directory at the same time is answered.
The member receives nothing forged.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq

from signalpost.client import SignalEvent, SignalpostClient
from signalpost.node_keys import create_node_keys, read_trusted
from signalpost.transport import frame
from signalpost.wire import Heartbeat, SignalCmd, encode_envelope, sender_object
from tests.cluster.conftest import ClusterFactory
from tests.helpers import curve_dealer, token

pytestmark = pytest.mark.cluster


async def test_a_dealer_without_the_clusters_keys_cannot_forge_a_signal(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    cluster = cluster_factory(edges=2, brokers=1)
    edge1, edge2 = cluster.edge_urls
    (broker,) = cluster.of_kind("broker")
    server_key = read_trusted(cluster.keys_dir).servers[broker["url"]]
    # A pair of the rogue's own, not in the cluster keys directory.
    _, rogue_secret = create_node_keys(tmp_path, "rogue", kind="edge")
    rogue_public, _ = zmq.auth.load_certificate(rogue_secret)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with (
            SignalpostClient(edge1, token("alice")) as alice,
            SignalpostClient(edge2, token("bob")) as bob,
        ):
            await alice.join("call")
            await bob.join("call")
            forged = frame(
                [
                    encode_envelope(Heartbeat("rogue-edge", "rogue")),  # answered at once
                    encode_envelope(
                        SignalCmd(
                            alice.session,
                            "conn-forged",
                            "rogue-edge",
                            1,
                            None,
                            "call",
                            bob.session,
                            sender_object(alice.session, "alice"),
                            b'{"kind":"offer","forged":true}',
                        )
                    ),
                ]
            )
            # The probe: a node added the way an operator adds one (its .key in the directory).
            _, probe_secret = create_node_keys(cluster.keys_dir, "probe", kind="edge")
            plain = context.socket(zmq.DEALER)  # no CurveZMQ at all
            plain.setsockopt(zmq.LINGER, 0)
            plain.setsockopt(zmq.IDENTITY, b"rogue-1")
            plain.connect(broker["url"])
            keyed = curve_dealer(context, broker["url"], b"rogue-2", rogue_secret, server_key)
            probe = curve_dealer(context, broker["url"], b"probe", probe_secret, server_key)
            for sock in (plain, keyed, probe):
                # The probe only heartbeats here (an admitted node's forgeries: below).
                sock.send(
                    frame([encode_envelope(Heartbeat("probe", "p"))]) if sock is probe else forged
                )
            async with asyncio.timeout(10):  # the probe is answered (its heartbeat)...
                while not probe.poll(0):  # noqa: ASYNC110 - a plain zmq socket
                    await asyncio.sleep(0.02)
            assert not plain.poll(0) and not keyed.poll(0)  # ...the rogues are not
            # The broker logs the keyed rogue's refusal (bounded wait: a log file).
            async with asyncio.timeout(10):
                while "refused a node link" not in cluster.log(broker["id"]):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert rogue_public.decode() in cluster.log(broker["id"])
            # Marker: a real signal after the forged ones; bob's next signal must be it.
            await alice.signal("call", {"kind": "marker"}, to=bob.session)
            event = await bob.next_event(SignalEvent, timeout=10)
            assert event.data == {"kind": "marker"}
            for sock in (plain, keyed, probe):
                sock.close()
    finally:
        context.destroy(linger=0)


async def test_an_admitted_node_cannot_send_as_another(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    # A node whose key IS in the cluster keys directory (say, a compromised edge) tries the
    # same forgery two ways: under another node's routing id, and under its own with the
    # member's real edge named in the envelope. The broker refuses both (its key's name is
    # not that node's; the envelope names another node than the link), logs them, and
    # still serves the admitted node's honest heartbeat. (A routing id in use by a
    # connected node is refused by ZeroMQ itself: ROUTER without handover.)
    cluster = cluster_factory(edges=2, brokers=1)
    edge1, edge2 = cluster.edge_urls
    (broker,) = cluster.of_kind("broker")
    server_key = read_trusted(cluster.keys_dir).servers[broker["url"]]
    _, secret_file = create_node_keys(cluster.keys_dir, "admitted", kind="edge")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with (
            SignalpostClient(edge1, token("alice")) as alice,
            SignalpostClient(edge2, token("bob")) as bob,
        ):
            await alice.join("call")
            await bob.join("call")
            real_edge = "edge-1"  # alice's edge (cluster_factory names them in order)

            def forged(edge: str) -> bytes:
                command = SignalCmd(
                    alice.session,
                    "c.9",
                    edge,
                    1,
                    None,
                    "call",
                    bob.session,
                    sender_object(alice.session, "alice"),
                    b'{"kind":"offer","forged":true}',
                )
                return frame([encode_envelope(command)])

            heartbeat = frame([encode_envelope(Heartbeat("admitted", "a"))])
            sockets = []
            for identity, bodies in (
                (b"presence-1", [forged(real_edge)]),  # another node's routing id
                # Its own, naming another (after a heartbeat: a broker takes requests only
                # from a node that heartbeated, naming its run or none).
                (b"admitted", [heartbeat, forged(real_edge)]),
            ):
                sock = curve_dealer(context, broker["url"], identity, secret_file, server_key)
                for body in bodies:
                    sock.send(body)
                sockets.append(sock)
            async with asyncio.timeout(10):  # the honest heartbeat is answered
                while not sockets[1].poll(0):  # noqa: ASYNC110 - a plain zmq socket
                    await asyncio.sleep(0.02)
            async with asyncio.timeout(10):  # both forgeries refused and logged
                while not all(  # noqa: ASYNC110 - a log file
                    f"refused frames from node {who}" in cluster.log(broker["id"])
                    for who in ("presence-1 (identity)", "admitted (sender)")
                ):
                    await asyncio.sleep(0.05)
            await alice.signal("call", {"kind": "marker"}, to=bob.session)
            event = await bob.next_event(SignalEvent, timeout=10)
            assert event.data == {"kind": "marker"}  # nothing forged came before it
            for sock in sockets:
                sock.close()
    finally:
        context.destroy(linger=0)
