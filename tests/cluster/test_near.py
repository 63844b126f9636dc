"""Near things first in a real two-region cluster (``signalpost cluster --regions eu,us``):
each edge lists every region's edges at ``/v1/edges`` and hands out its own region's
STUN/TURN first, learnt from the other region's Consul (``?dc=``); the Python SDK given
both regions' URLs picks the nearer one and, when that region dies whole, resumes the
session in the other."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import pytest

from signalpost.client import (
    Disconnected,
    PeerLeft,
    RequestTimeout,
    Resumed,
    SignalEvent,
    SignalpostClient,
)
from signalpost.cluster import free_port
from signalpost.wan_relay import WanRelay
from tests.binaries import require_binary
from tests.cluster.conftest import Cluster, ClusterFactory
from tests.helpers import raw_client, token

pytestmark = [pytest.mark.cluster, pytest.mark.consul]


def _edge(cluster: Cluster, region: str) -> str:
    (url,) = [p["url"] for p in cluster.of_kind("edge") if p.get("region") == region]
    return str(url)


def _edges(edge_url: str, query: str = "") -> Any:
    base = edge_url.replace("ws://", "http://").removesuffix("/v1/signal")
    with urllib.request.urlopen(f"{base}/v1/edges{query}", timeout=5) as response:
        return json.loads(response.read())


async def _until(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.2)


async def test_near_things_first_across_two_regions(cluster_factory: ClusterFactory) -> None:
    require_binary("consul")
    cluster = cluster_factory(
        edges=1,
        brokers=1,
        consul="on",
        regions="eu,us",
        wan_delay="40ms",
        SIGNALPOST_ROOM_HOMES="eu-*=eu,us-*=us",
        SIGNALPOST_TURN_SECRET="one-secret-for-every-regions-coturn",
        SIGNALPOST_TURN_URLS__EU="turn:turn.eu.example:3478",
        SIGNALPOST_STUN_URLS__EU="stun:stun.eu.example:3478",
        SIGNALPOST_TURN_URLS__US="turn:turn.us.example:3478",
        SIGNALPOST_STUN_URLS__US="stun:stun.us.example:3478",
    )
    eu, us = _edge(cluster, "eu"), _edge(cluster, "us")
    everything = [{"region": "eu", "edges": [eu]}, {"region": "us", "edges": [us]}]
    await _until(lambda: _edges(eu) == {"regions": everything})
    await _until(lambda: _edges(us) == {"regions": everything[::-1]})
    assert _edges(eu, "?region=us") == {"regions": [{"region": "us", "edges": [us]}]}
    assert _edges(us, "?region=eu") == {"regions": [{"region": "eu", "edges": [eu]}]}
    for edge, near, far in ((eu, "eu", "us"), (us, "us", "eu")):
        client = await raw_client(edge, "alice")
        assert [s["urls"][0] for s in client.welcome["ice_servers"]] == [
            f"stun:stun.{near}.example:3478",
            f"turn:turn.{near}.example:3478",
            f"stun:stun.{far}.example:3478",
            f"turn:turn.{far}.example:3478",
        ]
        await client.close()

    # eu is 40 ms away each way from this client (a relay in front of its edge), us is not.
    listen = free_port()
    eu_port = int(eu.rsplit(":", 1)[1].split("/")[0])
    async with WanRelay([(("127.0.0.1", listen), ("127.0.0.1", eu_port))], 0.04):
        far_eu = f"ws://127.0.0.1:{listen}/v1/signal"
        regions = {"eu": [far_eu], "us": [us]}
        alice = SignalpostClient(regions, token("alice"), nearest=True, request_timeout=3)
        bob = SignalpostClient(eu, token("bob"))
        async with alice, bob:
            assert alice.region == "us"
            assert alice.region_rtts["eu"] is not None and alice.region_rtts["us"] is not None
            assert alice.region_rtts["eu"] >= 0.08 > alice.region_rtts["us"]
            await alice.join("us-room")
            await alice.join("eu-room")  # homed in eu: reached across the WAN
            await bob.join("eu-room")
            session = alice.session
            assert session is not None
            # The whole us region dies (kill -9: edges, brokers, presence, Consul, relay).
            for process in cluster.processes:
                if process.get("region") == "us":
                    cluster.kill(process["id"])
            assert not (await alice.next_event(Disconnected, timeout=10)).final
            resumed = await alice.next_event(Resumed, timeout=30)
            assert (alice.region, alice.url) == ("eu", far_eu)
            # The resume token is good on any edge of any region: the session continues
            # under its id (its presence and its us-homed room stayed in us: see
            # docs/multi-region.md), and rooms of the living region serve it.
            assert resumed.session == session
            # Her room homed in the living region goes on: bob's signal reaches her there.
            await bob.signal("eu-room", {"after": "failover"}, to=session)
            got = await alice.next_event(SignalEvent, timeout=10)
            assert (got.room, got.data) == ("eu-room", {"after": "failover"})
            assert not [e for e in bob.pending_events() if isinstance(e, PeerLeft)]
            joined = await alice.join("eu-after")
            assert joined["room"] == "eu-after"
            # A room pinned to the dead region is not served (pinned rooms are not
            # re-homed): its requests wait for that region and time out.
            with pytest.raises(RequestTimeout):
                await alice.signal("us-room", {"n": 1})
