"""An edge's view of another region's brokers: who is dialled where, what waits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from edge.remote_brokers import RemoteBrokers
from signalpost.cluster import Child, _links_alive, _metrics_url
from signalpost.health import HealthServer
from signalpost.ownership import View
from signalpost.placement import owner
from signalpost.wire import DetachCmd


class Link:
    """What RemoteBrokers needs of a link: an endpoint, liveness, send, close."""

    def __init__(self, endpoint: str, dial: str) -> None:
        self.endpoint, self.dial = endpoint, dial
        self.alive = True
        self.sent: list[Any] = []
        self.closed = False

    def send(self, envelope: Any) -> None:
        self.sent.append(envelope)

    async def close(self) -> None:
        self.closed = True


def envelope(n: int) -> DetachCmd:
    return DetachCmd(f"s{n}", "c", "edge", False)


async def test_brokers_are_dialled_only_at_the_address_they_advertise() -> None:
    made: list[Link] = []

    def link(broker: str, dial: str) -> Link:
        made.append(Link(broker, dial))
        return made[-1]

    changes: list[None] = []
    remote = RemoteBrokers("eu", link, lambda: changes.append(None))  # type: ignore[arg-type]
    # The view comes first: its members are not dialled by name (an address inside eu).
    remote.update_view(View(7, ("tcp://a:1", "tcp://b:1")))
    assert made == []
    remote.send("room", envelope(1))  # waits for its owner's link
    remote.update_members({"tcp://a:1": "tcp://wan-a:9", "tcp://b:1": "tcp://wan-b:9"})
    assert sorted(m.dial for m in made) == ["tcp://wan-a:9", "tcp://wan-b:9"]
    target = remote.links[owner("room", ["tcp://a:1", "tcp://b:1"])]
    assert [e.session for e in target.sent] == ["s1"]  # sent on once the owner was found
    # A broker that now advertises another address is dialled again there.
    first = remote.links["tcp://a:1"]
    remote.update_members({"tcp://a:1": "tcp://wan-a2:9", "tcp://b:1": "tcp://wan-b:9"})
    await asyncio.sleep(0)  # the old link closes in a task
    assert first.closed and remote.links["tcp://a:1"].dial == "tcp://wan-a2:9"
    assert remote.links["tcp://b:1"].dial == "tcp://wan-b:9" and len(made) == 3
    assert changes  # every change of placement makes the edge look owners up again


async def test_what_waits_for_an_unknown_region_is_bounded() -> None:
    from edge.remote_brokers import MAX_PENDING

    remote = RemoteBrokers("us", lambda b, d: Link(b, d), lambda: None)  # type: ignore[arg-type,return-value]
    for n in range(MAX_PENDING + 5):
        remote.send("room", envelope(n))
    remote.update_members({"tcp://x:1": "tcp://x:1"})
    (link,) = remote.links.values()
    sent = [e.session for e in link.sent]  # type: ignore[attr-defined]
    assert len(sent) == MAX_PENDING and sent[0] == "s5"  # the oldest were dropped


async def test_the_links_alive_to_a_region_are_a_metric_the_launcher_reads(tmp_path: Any) -> None:
    """``signalpost_region_links_alive`` counts live links to the region's nodes (what
    ``signalpost cluster`` waits for before it says ready), read from the node's
    ``/metrics`` at the address its ready line names."""
    made: list[Link] = []

    def link(broker: str, dial: str) -> Link:
        made.append(Link(broker, dial))
        return made[-1]

    remote = RemoteBrokers("far", link, lambda: None)  # type: ignore[arg-type]
    remote.update_members({"b1": "tcp://10.0.0.1:1", "b2": "tcp://10.0.0.2:1"})
    made[1].alive = False
    health = HealthServer("127.0.0.1", 0)
    await health.start()
    try:
        log = Path(tmp_path) / "presence-1.log"
        log.write_text(
            f"starting\nsignalpost presence p1 ready on tcp://x:1, metrics {health.metrics_url}\n"
        )
        child = Child("presence", "p1", [], "tcp://x:1", {}, log, "tcp:1")
        url = _metrics_url(child)
        assert url == health.metrics_url
        alive = await asyncio.to_thread(_links_alive, url)
        assert alive[("far", "broker")] == 1
        made[1].alive = True
        assert (await asyncio.to_thread(_links_alive, url))[("far", "broker")] == 2
        await remote.close()
        assert (await asyncio.to_thread(_links_alive, url))[("far", "broker")] == 0
    finally:
        await health.close()
