"""Discovery through a real Consul agent: registration, routing, Consul restarts, new brokers.

The cluster gets no static endpoints: edges find brokers and presence, and brokers find
each other, only through Consul (``SIGNALPOST_CONSUL_ADDR``).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from signalpost.client import SignalEvent, SignalpostClient
from signalpost.cluster import free_port
from signalpost.node_keys import create_node_keys
from tests.cluster.conftest import FAST_ENV, Cluster, ClusterFactory, ticket_secret_of
from tests.consul import ConsulAgent
from tests.helpers import token

pytestmark = [pytest.mark.cluster, pytest.mark.consul]

ROOMS = [f"room-{n}" for n in range(12)]


@pytest.fixture
def consul_agent(tmp_path: Path) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(tmp_path / "consul")
    agent.workdir.mkdir()
    agent.start()
    yield agent
    agent.stop()


def consul_cluster(factory: ClusterFactory, agent: ConsulAgent, brokers: int) -> Cluster:
    cluster = factory(edges=2, brokers=brokers, SIGNALPOST_CONSUL_ADDR=agent.address)
    agent.wait_for(
        lambda: (
            len(agent.passing("edge")) == 2
            and len(agent.passing("broker")) == brokers
            and len(agent.passing("presence")) == 1
        )
    )
    return cluster


async def exchange(alice: SignalpostClient, bob: SignalpostClient, rooms: list[str]) -> None:
    """One acked signal alice -> bob in every room; bob gets each exactly once."""
    for room in rooms:
        await alice.signal(room, {"room": room}, to=bob.session)
    got = sorted([(await bob.next_event(SignalEvent, timeout=10)).room for _ in rooms])
    assert got == sorted(rooms)


async def test_nodes_register_route_and_deregister_on_sigterm(
    cluster_factory: ClusterFactory, consul_agent: ConsulAgent
) -> None:
    cluster = consul_cluster(cluster_factory, consul_agent, brokers=2)
    brokers = consul_agent.passing("broker")
    assert {b["id"] for b in cluster.of_kind("broker")} == brokers.keys()
    assert {b["url"] for b in cluster.of_kind("broker")} == set(brokers.values())
    assert set(consul_agent.passing("edge").values()) == set(cluster.edge_urls)
    edge1, edge2 = cluster.edge_urls
    async with (
        SignalpostClient(edge1, token("alice")) as alice,
        SignalpostClient(edge2, token("bob")) as bob,
    ):
        for room in ROOMS:  # rendezvous hashing spreads them over both brokers
            await alice.join(room)
            await bob.join(room)
        await exchange(alice, bob, ROOMS)

        cluster.kill("broker-2", signal.SIGTERM)
        took = await asyncio.to_thread(
            consul_agent.wait_for, lambda: "broker-2" not in consul_agent.registered("broker")
        )
        print(f"broker-2 deregistered {took:.2f} s after SIGTERM")
        # Its rooms moved to broker-1 (rebuilt from the edges); routing goes on.
        await exchange(alice, bob, ROOMS)
    assert all(cluster.alive(p["id"]) for p in cluster.processes if p["id"] != "broker-2")


async def test_routing_continues_while_consul_restarts(
    cluster_factory: ClusterFactory, consul_agent: ConsulAgent
) -> None:
    cluster = consul_cluster(cluster_factory, consul_agent, brokers=2)
    edge1, edge2 = cluster.edge_urls
    sent = 0
    async with (
        SignalpostClient(edge1, token("alice")) as alice,
        SignalpostClient(edge2, token("bob")) as bob,
    ):
        for room in ROOMS[:4]:
            await alice.join(room)
            await bob.join(room)

        async def send(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                await alice.signal(ROOMS[sent % 4], {"n": sent}, to=bob.session)  # acked
                sent += 1

        await send(20)
        consul_agent.kill()
        # Consul is gone: nodes keep their last known membership. Signals still route,
        # and a new client on the other edge joins and talks.
        await send(20)
        async with SignalpostClient(edge2, token("carol")) as carol:
            await carol.join("during-outage")
            await alice.join("during-outage")
            await carol.signal("during-outage", {"hello": "alice"}, to=alice.session)
            assert (await alice.next_event(SignalEvent, timeout=10)).data == {"hello": "alice"}

        consul_agent.start()  # same ports, empty state: every node must register again
        took = await asyncio.to_thread(
            consul_agent.wait_for,
            lambda: (
                len(consul_agent.passing("edge")) == 2
                and len(consul_agent.passing("broker")) == 2
                and len(consul_agent.passing("presence")) == 1
            ),
        )
        print(f"all 5 nodes registered and passing {took:.2f} s after Consul came back")
        await send(20)

        events = [await bob.next_event(SignalEvent, timeout=10) for _ in range(sent)]
        got = [e.data["n"] for e in events]
        # Every acked signal, exactly once, in order per room: the order promise is per
        # (sender, room). Across rooms (different owners, different links to bob's edge) a
        # signal sent after another's ack may still overtake that one's delivery.
        assert sorted(got) == list(range(sent))
        for room in ROOMS[:4]:
            in_room = [e.data["n"] for e in events if e.room == room]
            assert in_room == sorted(in_room), (room, in_room)
        # And no copy came after them. The markers: one more signal in each room, which
        # the room's owner sends bob after everything before it; a copy would come first.
        for room in ROOMS[:4]:
            await alice.signal(room, {"marker": room}, to=bob.session)
        markers = [await bob.next_event(SignalEvent, timeout=10) for _ in range(4)]
        assert sorted(((e.room, e.data) for e in markers), key=lambda pair: pair[0]) == [
            (room, {"marker": room}) for room in sorted(ROOMS[:4])
        ]
    assert all(cluster.alive(p["id"]) for p in cluster.processes)


def _start_broker(
    broker_id: str, agent: ConsulAgent, health_port: int, log_dir: Path, keys_dir: Path
) -> subprocess.Popen[bytes]:
    """One more broker, outside the cluster, that only Consul tells the others about.

    Its key pair goes into the cluster keys directory (with the endpoint it binds), so the
    others admit it and can dial it: how an operator adds a node.
    """
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    name = f"{broker_id}-{endpoint.rsplit(':', 1)[1]}"  # each attempt: a new pair
    _, secret_path = create_node_keys(keys_dir, name, endpoint, kind="broker")
    with (log_dir / f"{broker_id}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "signalpost.cli", "broker", "--id", broker_id,
             "--bind", endpoint],
            env={**os.environ, **FAST_ENV, "SIGNALPOST_CONSUL_ADDR": agent.address,
                 "SIGNALPOST_HEALTH_PORT": str(health_port),
                 "SIGNALPOST_NODE_KEY_FILE": str(secret_path),
                 "SIGNALPOST_CLUSTER_KEYS_DIR": str(keys_dir),
                 "SIGNALPOST_TICKET_SECRET": ticket_secret_of(keys_dir)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def _envelopes_handled(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=2) as response:
        text = response.read().decode()
    match = re.search(r'^signalpost_envelopes_total\{kind="broker"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_a_broker_added_while_running_takes_rooms(
    cluster_factory: ClusterFactory, consul_agent: ConsulAgent, tmp_path: Path
) -> None:
    cluster = consul_cluster(cluster_factory, consul_agent, brokers=1)
    edge1, edge2 = cluster.edge_urls
    for _attempt in range(3):
        # A port free_port() found can be taken by another process before the broker
        # binds it (the broker then exits at once): start again on other ports.
        health_port = free_port()
        newcomer = _start_broker(
            "broker-new", consul_agent, health_port, tmp_path, cluster.keys_dir
        )
        try:
            newcomer.wait(1.0)
        except subprocess.TimeoutExpired:
            break
    else:
        pytest.fail("the new broker could not start: see broker-new.log")
    try:
        async with (
            SignalpostClient(edge1, token("alice")) as alice,
            SignalpostClient(edge2, token("bob")) as bob,
        ):
            for room in ROOMS:
                await alice.join(room)
                await bob.join(room)
            await asyncio.to_thread(
                consul_agent.wait_for, lambda: "broker-new" in consul_agent.passing("broker")
            )
            # The edges follow the view in Consul: some rooms move to the newcomer, handed
            # over by the broker that had them, and signals in every room keep arriving.
            metrics_url = f"http://127.0.0.1:{health_port}/metrics"
            deadline = time.monotonic() + 20
            while await asyncio.to_thread(_envelopes_handled, metrics_url) == 0:
                assert time.monotonic() < deadline, "the new broker never got a room"
                await exchange(alice, bob, ROOMS)
                await asyncio.sleep(0.2)  # it joins the view once its check passes
            await exchange(alice, bob, ROOMS)
            assert await asyncio.to_thread(_envelopes_handled, metrics_url) > 0
    finally:
        newcomer.terminate()
        newcomer.wait(20)
    assert newcomer.returncode == 0
