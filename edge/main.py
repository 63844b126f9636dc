"""The edge process: an ``EdgeServer`` on a ``ZmqBackplane``; SIGTERM drains clients,
SIGHUP reloads the TLS certificate (``edge.tls``)."""

from __future__ import annotations

from edge.server import SIGNAL_PATH, EdgeServer
from edge.tls import reload_on_sighup
from edge.zmq_backplane import ZmqBackplane
from signalpost.config import Settings
from signalpost.discovery import Discovery, Registration
from signalpost.lifecycle import until_stopped
from signalpost.near import RegionDirectory, edge_entries_of, edge_meta
from signalpost.node_keys import edge_id_for


async def run_edge(settings: Settings) -> None:
    """Run one edge until SIGTERM/SIGINT, then close clients with 1001 and exit.

    With Consul, the edge registers once it serves (its ``/healthz`` is the check) and
    deregisters before draining, so nothing new is sent its way while clients leave.
    """
    backplane = ZmqBackplane(settings)
    # Its links speak under its key's name: that is its id (a different node_id is refused).
    edge = EdgeServer(settings, backplane, edge_id=edge_id_for(settings, backplane.keys))
    async with edge:
        discovery = await edge_discovery(settings, edge) if settings.consul_addr else None
        print(f"signalpost edge {edge.edge_id} ready on {edge.url}", flush=True)
        try:
            with reload_on_sighup(edge.tls):
                await until_stopped()
        finally:
            if discovery is not None:
                await discovery.close()


async def edge_discovery(settings: Settings, edge: EdgeServer) -> Discovery:
    """Register ``edge`` in Consul (its ws URL, region and its region's STUN/TURN URLs;
    its ``/healthz`` as the check) and follow every region's edges (``follow_regions``)."""
    assert settings.consul_addr is not None
    check_url = edge.url.replace("ws", "http", 1).removesuffix(SIGNAL_PATH) + "/healthz"
    registration = Registration(
        "edge",
        edge.edge_id,
        edge.url,
        check_url,
        region=settings.region,
        extra_meta=edge_meta(settings.stun_urls, settings.turn_urls),
    )
    discovery = Discovery(settings.consul_addr, registration, settings.consul_token)
    await discovery.start()
    follow_regions(discovery, edge.directory)
    return discovery


def follow_regions(discovery: Discovery, directory: RegionDirectory) -> None:
    """Follow each region's healthy edges in Consul: this edge's own through its agent, the
    others' with ``?dc=`` (blocking queries, at most one per 0.2 s each; none to other
    regions with fewer than two ``regions``)."""
    for region in directory.regions:
        dc = None if region == directory.region else region

        def changed(members: dict[str, str], region: str = region) -> None:
            directory.update(region, members)

        discovery.watch("edge", changed, dc=dc, members=edge_entries_of)
