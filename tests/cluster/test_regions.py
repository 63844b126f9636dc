"""Two regions on one machine: ``signalpost cluster --regions eu,us --wan-delay 40ms``.

Each region is its own Consul datacenter (WAN-joined) with its own edges, brokers and
presence; a region serves its rooms alone, also when the other region is gone; nodes of
one region find the other's through Consul and reach them only through the emulated WAN.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from typing import Any

import pytest

from signalpost.client import PeerJoined, SignalEvent, SignalpostClient
from tests.binaries import require_binary, require_module
from tests.cluster.conftest import Cluster, ClusterFactory
from tests.helpers import load_aiortc_example, token

pytestmark = [pytest.mark.cluster, pytest.mark.consul]

DELAY = 0.04


def _in(cluster: Cluster, region: str, kind: str) -> list[dict[str, Any]]:
    return [p for p in cluster.of_kind(kind) if p.get("region") == region]


def _consul_get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


async def _call_in(edges: list[str], room: str) -> None:
    """Two clients on the region's two edges: a join and a signal each way."""
    async with (
        SignalpostClient(edges[0], token("alice")) as alice,
        SignalpostClient(edges[1], token("bob")) as bob,
    ):
        await alice.join(room)
        await bob.join(room)
        await alice.next_event(PeerJoined)
        assert alice.session is not None and bob.session is not None
        await alice.signal(room, {"sdp": "offer"}, to=bob.session)
        assert (await bob.next_event(SignalEvent)).data == {"sdp": "offer"}
        await bob.signal(room, {"sdp": "answer"}, to=alice.session)
        assert (await alice.next_event(SignalEvent)).data == {"sdp": "answer"}


async def test_each_region_serves_its_own_rooms_and_outlives_the_other(
    cluster_factory: ClusterFactory,
) -> None:
    require_binary("consul")
    cluster = cluster_factory(
        edges=2,
        brokers=1,
        consul="on",
        regions="eu,us",
        wan_delay="40ms",
        SIGNALPOST_ROOM_HOMES="pinned-eu-*=eu",
    )
    (eu_consul,) = _in(cluster, "eu", "consul")
    (us_consul,) = _in(cluster, "us", "consul")
    assert set(_consul_get(f"{eu_consul['url']}/v1/catalog/datacenters")) == {"eu", "us"}
    # Discovery stays region-local: each region's Consul lists only its own brokers.
    for region, agent in (("eu", eu_consul), ("us", us_consul)):
        listed = _consul_get(f"{agent['url']}/v1/health/service/signalpost-broker?passing=1")
        assert [e["Service"]["Meta"]["region"] for e in listed] == [region]
    await _call_in([p["url"] for p in _in(cluster, "us", "edge")], "room-us")
    eu_edges = [p["url"] for p in _in(cluster, "eu", "edge")]
    async with (
        SignalpostClient(eu_edges[0], token("alice")) as alice,
        SignalpostClient(eu_edges[1], token("bob")) as bob,
    ):
        await alice.join("room-eu")  # its first member is in eu: homed in eu
        await bob.join("room-eu")
        await alice.next_event(PeerJoined)
        assert bob.session is not None
        await alice.signal("room-eu", {"n": 1}, to=bob.session)
        assert (await bob.next_event(SignalEvent)).data == {"n": 1}
        # The whole us region dies (kill -9, Consul and relay included): eu's room goes on,
        # whichever region arbitrated its home, and so does a new room pinned to eu.
        for process in cluster.processes:
            if process.get("region") == "us":
                cluster.kill(process["id"])
        for n in range(2, 12):
            await alice.signal("room-eu", {"n": n}, to=bob.session)
            assert (await bob.next_event(SignalEvent)).data == {"n": n}
    assert all(cluster.alive(p["id"]) for p in cluster.processes if p.get("region") == "eu")
    await _call_in(eu_edges, "pinned-eu-after")


async def test_another_regions_nodes_are_found_in_consul_and_reached_through_the_wan(
    cluster_factory: ClusterFactory,
) -> None:
    require_binary("consul")
    cluster = cluster_factory(edges=1, brokers=1, consul="on", regions="eu,us", wan_delay="40ms")
    (us_consul,) = _in(cluster, "us", "consul")
    (eu_broker,) = _in(cluster, "eu", "broker")
    # Asked through the us agent, Consul answers for the eu datacenter.
    (entry,) = _consul_get(
        f"{us_consul['url']}/v1/health/service/signalpost-broker?dc=eu&passing=1"
    )
    meta = entry["Service"]["Meta"]
    assert meta["endpoint"] == eu_broker["url"] and meta["region"] == "eu"
    wan = meta["wan_endpoint"]
    assert wan != eu_broker["url"]
    # The broker greets a new ZeroMQ peer at once (ZMTP's signature, first byte 0xFF):
    # through the emulated WAN the greeting takes the one-way delay, directly it does not.
    timings = {}
    for name, endpoint in (("wan", wan), ("direct", eu_broker["url"])):
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        started = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=5) as probe:
            probe.settimeout(5)
            assert probe.recv(1) == b"\xff"
            timings[name] = time.monotonic() - started
    assert timings["wan"] >= DELAY > timings["direct"]


def _cross_region(edge_url: str) -> dict[tuple[str, str], float]:
    """The edge's ``signalpost_cross_region_envelopes`` counters by (region, direction)."""
    base = edge_url.replace("ws://", "http://").removesuffix("/v1/signal")
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("signalpost_cross_region_envelopes_total{"):
            labels, value = line.rsplit(" ", 1)
            parts = dict(p.split("=", 1) for p in labels[labels.index("{") + 1 : -1].split(","))
            found[parts["region"].strip('"'), parts["direction"].strip('"')] = float(value)
    return found


async def test_a_room_homed_in_one_region_serves_members_of_both(
    cluster_factory: ClusterFactory,
) -> None:
    require_binary("consul")
    cluster = cluster_factory(
        edges=1,
        brokers=2,
        consul="on",
        regions="eu,us",
        wan_delay="40ms",
        SIGNALPOST_ROOM_HOMES="eu-*=eu,us-*=us",
    )
    (eu_edge,) = [p["url"] for p in _in(cluster, "eu", "edge")]
    (us_edge,) = [p["url"] for p in _in(cluster, "us", "edge")]
    async with (
        SignalpostClient(eu_edge, token("alice")) as alice,
        SignalpostClient(us_edge, token("bob")) as bob,
    ):
        # "eu-call" is homed in eu: bob (in us) reaches it through his own edge.
        await alice.join("eu-call")
        joined = await bob.join("eu-call")
        assert [m["session"] for m in joined["members"]] == [alice.session]
        await alice.next_event(PeerJoined)
        assert alice.session is not None and bob.session is not None
        started = time.monotonic()
        await bob.signal("eu-call", {"sdp": "offer"}, to=alice.session)  # acked by eu's owner
        acked_after = time.monotonic() - started
        assert (await alice.next_event(SignalEvent)).data == {"sdp": "offer"}
        await alice.signal("eu-call", {"sdp": "answer"}, to=bob.session)
        assert (await bob.next_event(SignalEvent)).data == {"sdp": "answer"}
        assert acked_after >= 2 * DELAY  # the ack came from the other region: a round trip
        crossed = _cross_region(us_edge)
        assert crossed.get(("eu", "out"), 0) > 0 and crossed.get(("eu", "in"), 0) > 0
        assert _cross_region(eu_edge) == {}  # alice's edge is home: nothing crossed for her
    # A room homed in us with both members in us sends nothing across regions.
    before = _cross_region(us_edge)
    async with (
        SignalpostClient(us_edge, token("carol")) as carol,
        SignalpostClient(us_edge, token("dave")) as dave,
    ):
        await carol.join("us-local")
        await dave.join("us-local")
        await carol.next_event(PeerJoined)
        assert dave.session is not None
        await carol.signal("us-local", {"n": 1}, to=dave.session)
        assert (await dave.next_event(SignalEvent)).data == {"n": 1}
    assert _cross_region(us_edge) == before


async def test_an_unpinned_room_is_homed_in_its_first_members_region(
    cluster_factory: ClusterFactory,
) -> None:
    require_binary("consul")
    cluster = cluster_factory(edges=1, brokers=1, consul="on", regions="eu,us", wan_delay="40ms")
    (eu_edge,) = [p["url"] for p in _in(cluster, "eu", "edge")]
    (us_edge,) = [p["url"] for p in _in(cluster, "us", "edge")]
    for room, first, second, home in (
        ("call-1", us_edge, eu_edge, "us"),
        ("call-2", eu_edge, us_edge, "eu"),
    ):
        async with (
            SignalpostClient(first, token("alice")) as alice,
            SignalpostClient(second, token("bob")) as bob,
        ):
            await alice.join(room)
            joined = await bob.join(room)
            assert [m["session"] for m in joined["members"]] == [alice.session]
            await alice.next_event(PeerJoined)
            assert bob.session is not None
            await alice.signal(room, {"n": 1}, to=bob.session)
            assert (await bob.next_event(SignalEvent)).data == {"n": 1}
        # The first member's edge is home: only the second member's edge crossed, to it.
        assert _cross_region(first).get((home, "out"), 0) == 0
        assert _cross_region(second).get((home, "out"), 0) > 0


async def test_a_webrtc_call_across_regions_signals_through_the_rooms_home(
    cluster_factory: ClusterFactory,
) -> None:
    require_binary("consul")
    require_module("aiortc", "pip install -e '.[webrtc]'")
    aiortc_call = load_aiortc_example()
    cluster = cluster_factory(edges=1, brokers=1, consul="on", regions="eu,us", wan_delay="40ms")
    (eu_edge,) = [p["url"] for p in _in(cluster, "eu", "edge")]
    (us_edge,) = [p["url"] for p in _in(cluster, "us", "edge")]
    async with asyncio.timeout(60):
        result = await aiortc_call.run_call(
            eu_edge, us_edge, "webrtc-across", token("alice"), token("bob"), messages=3
        )
    assert result.pings_received == ["ping 1", "ping 2", "ping 3"]
    assert result.pongs_received == ["pong 1", "pong 2", "pong 3"]
    # The caller joined first from eu: the room is homed there; only bob's edge crossed.
    assert _cross_region(eu_edge).get(("us", "out"), 0) == 0
    assert _cross_region(us_edge)[("eu", "out")] > 0
