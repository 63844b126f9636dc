"""Near things first, with real edges: ``GET /v1/edges``, ICE servers ordered by region
(two regions as two real, WAN-joined Consul datacenters), and the Python SDK's region
fallback and nearest-region pick against real edges and a real delaying relay."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.main import edge_discovery
from edge.server import EdgeServer
from signalpost.client import Disconnected, Resumed, SignalpostClient
from signalpost.cluster import free_port
from signalpost.near import RegionDirectory
from signalpost.wan_relay import WanRelay
from tests.consul import ConsulAgent
from tests.helpers import raw_client, token, url_of
from tests.integration.conftest import DevFactory

TURN_SECRET = "turn-secret-shared-by-every-region"


def _get(url: str) -> tuple[int, dict[str, str], Any]:
    """Status, headers and JSON body of a GET (an HTTP error status is an answer too)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def _text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
    return text


def _edges_url(server: EdgeServer, query: str = "") -> str:
    return f"http://127.0.0.1:{server.port}/v1/edges" + (f"?{query}" if query else "")


async def _fetch(url: str) -> tuple[int, dict[str, str], Any]:
    return await asyncio.to_thread(_get, url)


async def test_edges_endpoint_answers_from_its_cache_and_refuses_what_it_cannot_serve(
    dev: EdgeServer,
) -> None:
    status, headers, body = await _fetch(_edges_url(dev))
    assert status == 200
    assert body == {"regions": [{"region": "", "edges": [url_of(dev)]}]}
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Cache-Control"] == "max-age=5"
    status, headers, body = await _fetch(_edges_url(dev, "region=mars"))
    assert status == 404
    assert body["type"] == "error" and body["code"] == "bad_request"
    assert "mars" in body["message"]
    # Past its token bucket the edge answers 429 rate_limited, with when to come back.
    dev.directory = RegionDirectory("", [], own_url=url_of(dev), rate=0.01, burst=2)
    statuses = [(await _fetch(_edges_url(dev)))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    status, headers, body = await _fetch(_edges_url(dev))
    assert (status, headers["Retry-After"], body["code"]) == (429, "1", "rate_limited")
    exposition = await asyncio.to_thread(_text, f"http://127.0.0.1:{dev.port}/metrics")
    assert 'signalpost_edges_answers_total{status="429"}' in exposition


@pytest.fixture
def two_datacenters(tmp_path: Path) -> Iterator[tuple[ConsulAgent, ConsulAgent]]:
    """Two Consul dev agents, datacenters eu and us, WAN-joined: two regions."""
    (tmp_path / "eu").mkdir()
    (tmp_path / "us").mkdir()
    eu = ConsulAgent(tmp_path / "eu", datacenter="eu")
    eu.start()
    us = ConsulAgent(tmp_path / "us", datacenter="us", join_wan=eu.ports["serf-wan"])
    try:
        us.start()
        eu.wait_for(lambda: set(eu.get("/v1/catalog/datacenters")) == {"eu", "us"})
        yield eu, us
    finally:
        us.stop()
        eu.stop()


async def _until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.1)


def _region_settings(region: str, consul: ConsulAgent) -> dict[str, Any]:
    return {
        "region": region,
        "regions": ["eu", "us"],
        "consul_addr": consul.address,
        "turn_secret": TURN_SECRET,
        "turn_urls": [f"turn:turn.{region}.example:3478"],
        "stun_urls": [f"stun:stun.{region}.example:3478"],
    }


async def test_each_regions_edge_hands_out_its_own_ice_first_and_lists_the_others_edges(
    dev_factory: DevFactory, two_datacenters: tuple[ConsulAgent, ConsulAgent]
) -> None:
    eu_agent, us_agent = two_datacenters
    eu = await dev_factory(**_region_settings("eu", eu_agent))
    us = await dev_factory(**_region_settings("us", us_agent))
    discoveries = [await edge_discovery(edge.settings, edge) for edge in (eu, us)]
    try:
        # Each learns the other region's edge through its own agent (?dc=).
        await _until(lambda: eu.directory.edges("us") == [url_of(us)])
        await _until(lambda: us.directory.edges("eu") == [url_of(eu)])
        status, _, body = await _fetch(_edges_url(eu, "region=us"))
        assert (status, body) == (200, {"regions": [{"region": "us", "edges": [url_of(us)]}]})
        status, _, body = await _fetch(_edges_url(us))
        assert body["regions"] == [
            {"region": "us", "edges": [url_of(us)]},
            {"region": "eu", "edges": [url_of(eu)]},
        ]
        for edge, near, far in ((eu, "eu", "us"), (us, "us", "eu")):
            client = await raw_client(url_of(edge), "alice")
            expected = [
                [f"stun:stun.{near}.example:3478"],
                [f"turn:turn.{near}.example:3478"],
                [f"stun:stun.{far}.example:3478"],
                [f"turn:turn.{far}.example:3478"],
            ]
            assert [s["urls"] for s in client.welcome["ice_servers"]] == expected
            reply = await client.request({"type": "ice-servers", "id": 1})
            assert [s["urls"] for s in reply["ice_servers"]] == expected
            turn = [s for s in reply["ice_servers"] if "username" in s]
            assert len({(s["username"], s["credential"]) for s in turn}) == 1
    finally:
        for discovery in discoveries:
            await discovery.close()


async def test_the_sdk_falls_back_to_the_next_region_when_a_regions_edges_fail(
    dev: EdgeServer,
) -> None:
    dead = f"ws://127.0.0.1:{free_port()}/v1/signal"
    async with SignalpostClient(
        {"eu": [dead, dead], "us": [url_of(dev)]}, token("alice"), request_timeout=2
    ) as client:
        assert (client.region, client.url) == ("us", url_of(dev))
        await client.ping()


async def test_the_sdk_picks_the_region_with_the_shorter_round_trip(dev: EdgeServer) -> None:
    listen = free_port()
    # The far region: the same edge behind a relay that holds every byte 60 ms each way.
    async with WanRelay([(("127.0.0.1", listen), ("127.0.0.1", dev.port))], 0.06):
        far = f"ws://127.0.0.1:{listen}/v1/signal"
        regions = {"far": [far], "near": [url_of(dev)]}
        client = SignalpostClient(regions, token("alice"), nearest=True)
        listed_first = SignalpostClient(regions, token("bob"))
        async with client, listed_first:
            assert client.region == "near"
            rtts = client.region_rtts
            assert rtts["far"] is not None and rtts["near"] is not None
            assert rtts["far"] >= 0.12 > rtts["near"]
            assert listed_first.region == "far"  # without nearest: the order given


async def test_a_session_resumes_in_the_next_region_when_its_region_goes(
    dev: EdgeServer,
) -> None:
    listen = free_port()
    relay = WanRelay([(("127.0.0.1", listen), ("127.0.0.1", dev.port))], 0.0)
    await relay.start()
    eu = f"ws://127.0.0.1:{listen}/v1/signal"  # region eu: reached through the relay
    async with SignalpostClient({"eu": [eu], "us": [url_of(dev)]}, token("alice")) as client:
        assert client.region == "eu"
        await client.join("r1")
        session = client.session
        await relay.close()  # eu is gone: its connections reset, its port refuses
        assert not (await client.next_event(Disconnected)).final
        resumed = await client.next_event(Resumed, timeout=10)
        assert resumed.resumed and resumed.session == session
        assert (client.region, client.url) == ("us", url_of(dev))
        await client.signal("r1", {"n": 1})  # its room goes on
