"""Global presence across two regions (issue 15): ``signalpost cluster --regions eu,us
--wan-delay 40ms``, two presence nodes per region.

A watcher in eu sees a user whose sessions are in us go online and offline; a user online
in both regions that leaves one stays online (one ``presence`` frame per real change);
the time from the user's hello in us to the watcher's frame in eu is measured against
the 40 ms one-way WAN delay (printed: ``pytest -s``).
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time

import pytest

from presence.regional import STALE_AFTER
from signalpost.client import PresenceChanged, SignalpostClient
from tests.binaries import require_binary
from tests.cluster.conftest import ClusterFactory
from tests.cluster.test_regions import DELAY, _in
from tests.helpers import token

pytestmark = [pytest.mark.cluster, pytest.mark.consul]

#: One-way delay budget beyond the WAN for a status to reach a watcher in another region.
BOUND = 1.0


async def _no_presence(client: SignalpostClient, within: float = 0.5) -> None:
    try:
        event = await client.next_event(PresenceChanged, timeout=within)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected presence frame: {event}")


async def test_a_watcher_in_one_region_sees_users_of_the_other(
    cluster_factory: ClusterFactory,
) -> None:
    require_binary("consul")
    cluster = cluster_factory(
        edges=1, brokers=1, presence=2, consul="on", regions="eu,us", wan_delay="40ms"
    )
    (eu_edge,) = [p["url"] for p in _in(cluster, "eu", "edge")]
    (us_edge,) = [p["url"] for p in _in(cluster, "us", "edge")]
    users = [f"roamer-{n}" for n in range(8)]
    # Users already online in us: a watch in eu answers with it (it waited for us).
    early = [SignalpostClient(us_edge, token(f"early-{n}")) for n in range(6)]
    for client in early:
        await client.connect()
    async with SignalpostClient(eu_edge, token("early-watcher")) as watcher:
        started = time.monotonic()
        answer = await watcher.watch([f"early-{n}" for n in range(6)])
        print(
            f"\nwatch in eu of 6 users online in us: answered in "
            f"{(time.monotonic() - started) * 1000:.0f} ms"
        )
        assert answer == {f"early-{n}": "online" for n in range(6)}
        await _no_presence(watcher)
    for client in early:
        await client.close()
    async with SignalpostClient(eu_edge, token("watcher")) as watcher:
        assert await watcher.watch(users) == dict.fromkeys(users, "offline")
        await asyncio.sleep(1.0)  # the watched users' owners subscribed in us
        delays = []
        for user in users:  # owners spread over both presence nodes of each region
            started = time.monotonic()
            async with SignalpostClient(us_edge, token(user)):
                event = await watcher.next_event(PresenceChanged, timeout=5)
                delays.append(time.monotonic() - started)
                assert (event.user, event.status) == (user, "online")
            event = await watcher.next_event(PresenceChanged, timeout=5)
            assert (event.user, event.status) == (user, "offline")
        print(
            f"\nus hello -> eu watcher frame at {DELAY * 1000:.0f} ms one-way: "
            f"median {statistics.median(delays) * 1000:.0f} ms, "
            f"max {max(delays) * 1000:.0f} ms over {len(delays)}"
        )
        assert min(delays) >= DELAY  # it crossed the WAN
        assert max(delays) < DELAY + BOUND

        # Online in both regions, then gone from one: still online, one frame in all.
        user = users[0]
        async with SignalpostClient(us_edge, token(user)):
            event = await watcher.next_event(PresenceChanged, timeout=5)
            assert (event.user, event.status) == (user, "online")
            async with SignalpostClient(eu_edge, token(user)):
                await _no_presence(watcher)
            await _no_presence(watcher)  # left eu: still online in us
            assert watcher.presence[user] == "online"
            async with SignalpostClient(eu_edge, token(user)):
                await _no_presence(watcher)
            await _no_presence(watcher)
        event = await watcher.next_event(PresenceChanged, timeout=5)
        assert (event.user, event.status) == (user, "offline")
        # And the other way: in eu first, then us too, eu left first.
        eu_session = SignalpostClient(eu_edge, token(user))
        await eu_session.connect()
        event = await watcher.next_event(PresenceChanged, timeout=5)
        assert (event.user, event.status) == (user, "online")
        async with SignalpostClient(us_edge, token(user)):
            await asyncio.sleep(0.5)
            await eu_session.close()
            await _no_presence(watcher, 1.0)
        event = await watcher.next_event(PresenceChanged, timeout=5)
        assert (event.user, event.status) == (user, "offline")
        await _no_presence(watcher)


async def test_a_lost_region_shows_its_last_status_then_offline_and_presence_goes_on(
    cluster_factory: ClusterFactory,
) -> None:
    """Every us process dies (kill -9, Consul and relay included): eu's watcher keeps the
    user's last status from us until the link has been down ``STALE_AFTER``, then sees
    it offline once; presence within eu goes on meanwhile."""
    require_binary("consul")
    cluster = cluster_factory(edges=1, brokers=1, consul="on", regions="eu,us", wan_delay="40ms")
    (eu_edge,) = [p["url"] for p in _in(cluster, "eu", "edge")]
    (us_edge,) = [p["url"] for p in _in(cluster, "us", "edge")]
    async with SignalpostClient(eu_edge, token("watcher")) as watcher:
        await watcher.watch(["abroad", "local"])
        await asyncio.sleep(1.0)
        abroad = SignalpostClient(us_edge, token("abroad"))
        await abroad.connect()
        event = await watcher.next_event(PresenceChanged, timeout=5)
        assert (event.user, event.status) == ("abroad", "online")
        for process in cluster.processes:
            if process.get("region") == "us":
                cluster.kill(process["id"])
        killed = time.monotonic()
        # Presence within eu is unaffected.
        async with SignalpostClient(eu_edge, token("local")):
            event = await watcher.next_event(PresenceChanged, timeout=5)
            assert (event.user, event.status) == ("local", "online")
        event = await watcher.next_event(PresenceChanged, timeout=5)
        assert (event.user, event.status) == ("local", "offline")
        # The last status from us holds until the link is down STALE_AFTER, then offline.
        event = await watcher.next_event(PresenceChanged, timeout=STALE_AFTER + 10)
        waited = time.monotonic() - killed
        assert (event.user, event.status) == ("abroad", "offline")
        print(f"\nregion us killed -> its user offline in eu after {waited:.1f} s")
        assert waited >= STALE_AFTER
        await _no_presence(watcher)
        await abroad.close()  # (its edge is gone: nothing to tell)


async def test_after_a_wan_cut_heals_the_status_is_synced_again(
    cluster_factory: ClusterFactory,
) -> None:
    """The us WAN relay is paused (SIGSTOP: nothing crosses into us) past ``STALE_AFTER``:
    eu's watcher sees the us user offline; resumed (SIGCONT), the links come back, eu's
    owner subscribes again and the watcher sees the user online again."""
    require_binary("consul")
    cluster = cluster_factory(edges=1, brokers=1, consul="on", regions="eu,us", wan_delay="40ms")
    (eu_edge,) = [p["url"] for p in _in(cluster, "eu", "edge")]
    (us_edge,) = [p["url"] for p in _in(cluster, "us", "edge")]
    (relay,) = _in(cluster, "us", "wan-relay")
    async with (
        SignalpostClient(eu_edge, token("watcher")) as watcher,
        SignalpostClient(us_edge, token("abroad")),
    ):
        await watcher.watch(["abroad"])
        if watcher.presence["abroad"] != "online":
            event = await watcher.next_event(PresenceChanged, timeout=5)
            assert (event.user, event.status) == ("abroad", "online")
        cluster.kill(relay["id"], signal.SIGSTOP)
        cut = time.monotonic()
        try:
            event = await watcher.next_event(PresenceChanged, timeout=STALE_AFTER + 10)
            assert (event.user, event.status) == ("abroad", "offline")
            print(f"\nWAN cut -> offline after {time.monotonic() - cut:.1f} s")
            await _no_presence(watcher, 1.0)
        finally:
            cluster.kill(relay["id"], signal.SIGCONT)
        healed = time.monotonic()
        event = await watcher.next_event(PresenceChanged, timeout=15)
        assert (event.user, event.status) == ("abroad", "online")
        print(f"\nWAN healed -> status synced again in {time.monotonic() - healed:.1f} s")
