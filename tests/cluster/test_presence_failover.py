"""Presence as N nodes (real processes, real Consul): a kill -9 of one of two presence nodes.

Users are placed on the presence nodes by rendezvous hashing over the presence view in
Consul. The watcher's node survives; the watched user's node is killed. The survivor
takes the users over when Consul's view leaves the dead node out; the edges re-sync their
sessions to it, so users who stay connected stay online, and the watcher hears each real
status change once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.cluster.conftest import Cluster, ClusterFactory
from tests.helpers import RawClient, raw_client

pytestmark = pytest.mark.cluster

ENV = {"SIGNALPOST_RATE_PER_SECOND": "1000", "SIGNALPOST_RATE_BURST": "1000"}
#: Consul's check (1 s), the new view, the edges' re-sync and the owner's answer: the
#: bound the tests hold failover to.
FAILOVER_BOUND = 15.0


def _placed(cluster: Cluster, on: str, prefix: str, count: int = 1) -> list[str]:
    """``count`` user names owned by presence node ``on`` (bounded search)."""
    names = [f"{prefix}-{i}" for i in range(200)]
    found = [n for n in names if cluster.presence_owner_of(n) == on][:count]
    assert len(found) == count
    return found


async def _presence_frames(
    client: RawClient, until: float
) -> tuple[list[dict[str, Any]], list[float]]:
    """Every presence frame ``client`` gets until the monotonic time ``until``, and when."""
    frames: list[dict[str, Any]] = []
    times: list[float] = []
    while (left := until - time.monotonic()) > 0:
        try:
            frame = await client.recv(timeout=left)
        except TimeoutError:
            break
        if frame["type"] == "presence":
            frames.append(frame)
            times.append(time.monotonic())
    return frames, times


async def test_kill_9_of_a_presence_node_keeps_watches_and_resumes(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(edges=2, brokers=1, presence=2, consul="on", **ENV)
    edge1, edge2 = cluster.edge_urls
    survivor, doomed = "presence-1", "presence-2"
    (wally,) = _placed(cluster, survivor, "wally")
    bob, carol = _placed(cluster, doomed, "bob", 2)

    watcher = await raw_client(edge1, wally)
    bob_client = await raw_client(edge2, bob)
    carol_client = await raw_client(edge1, carol)
    reply = await watcher.request({"type": "watch", "users": [bob, carol], "id": 1})
    assert reply == {"type": "watching", "presence": {bob: "online", carol: "online"}, "id": 1}

    cluster.kill(doomed)
    killed_at = time.monotonic()
    # Bob leaves while his owner is dead: his goodbye is lost with it; the survivor, once
    # it owns bob, learns from the edges that he is not connected any more.
    await bob_client.close()
    frames, times = await _presence_frames(watcher, killed_at + FAILOVER_BOUND)
    # Each change once: bob offline; carol, connected all along, never flaps.
    assert frames == [{"type": "presence", "user": bob, "status": "offline"}], frames
    offline_after = times[0] - killed_at

    # Bob comes back: told once, through the survivor.
    started = time.monotonic()
    bob_again = await raw_client(edge2, bob)
    (online,) = await watcher.until_markers({"type": "presence", "user": bob}, timeout=5)
    assert online["status"] == "online"
    told_after = time.monotonic() - started

    # Carol's session moved to the survivor with the edge's re-sync: it resumes.
    assert carol_client.ws.transport is not None
    carol_client.ws.transport.abort()
    await asyncio.sleep(0.3)
    resumed = await raw_client(edge2, carol, resume=carol_client.welcome["resume"])
    assert resumed.welcome["resumed"] is True
    assert resumed.session == carol_client.session

    # The watcher's own session lives on the survivor: its resume keeps its watches.
    assert watcher.ws.transport is not None
    watcher.ws.transport.abort()
    await asyncio.sleep(0.3)
    back = await raw_client(edge2, wally, resume=watcher.welcome["resume"])
    assert back.welcome["resumed"] is True
    await bob_again.close()
    (offline,) = await back.until_markers({"type": "presence", "user": bob}, timeout=5)
    assert offline["status"] == "offline"
    print(
        f"presence failover: bob offline told {offline_after:.2f} s after the kill; "
        f"online {told_after:.2f} s after he reconnected"
    )
